//! Arbitrary bytes into the jsonrpc-fdpass framer, pushed in two pieces to exercise messages
//! split across reads: it must yield messages, wait for more, or fail, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splitfdstream::proto::fdpass::Framer;

/// Small enough that the fuzzer reaches the message-size limit.
const MAX_MESSAGE_LEN: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).min(data.len());
    let mut framer = Framer::new(MAX_MESSAGE_LEN);
    for piece in [&data[..split], &data[split..]] {
        framer.push(piece);
        loop {
            match framer.next_message() {
                Ok(Some(msg)) => {
                    let _: serde_json::Value = msg;
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
