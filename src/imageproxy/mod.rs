//! `splitfdstream experimental-image-proxy`: skopeo's image proxy protocol (0.2.8) for local
//! images, so tools built on the `containers-image-proxy` crate (bootc, ostree-ext,
//! composefs-rs) read `containers-storage:` and `oci:` images through this crate, rootless
//! included. The protocol and where we differ from skopeo: `proto/image-proxy.md`.
//!
//! ```text
//!  client (containers-image-proxy)      this process (parent)                helpers
//!  ┌─────────────────────────┐ SEQPACKET ┌──────────────────────────────┐     ┌──────────┐
//!  │ OpenImage, GetManifest, │──────────▶│ serve: one request at a time │────▶│ helper   │
//!  │ GetBlob, FinishPipe …   │◀── pipes ─│ blob threads: tar from the   │◀─fds│ (userns  │
//!  └─────────────────────────┘           │ splitfdstream, verified      │     │ rootless)│
//!                                        └──────────────────────────────┘     └──────────┘
//! ```
//!
//! Requests are handled in order on the serving thread; every pipe is filled by a thread of its
//! own, so a client may hold several blobs open at once. Layers come from helpers started with
//! this crate's [`client`](crate::client) (one per layer being streamed, idle ones reused).

mod blob;
mod gojson;
mod image;
mod wire;

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::Value;

use blob::{BlobJob, Helpers, PipeOutcome};
use image::{BlobSource, Image};
use wire::{Failure, Reply, Request, arity, str_arg, uint_arg};

/// The protocol version announced by `Initialize`. Not 0.2.9: the Rust client reads that as
/// "has `OpenVarlinkSocket`", which we do not serve.
pub const PROTOCOL_VERSION: &str = "0.2.8";

/// Most pipes open at once (answered but not yet finished, or being written). Each holds a
/// thread, a copy buffer and, for a layer, a helper process: beyond this a request fails
/// rather than letting a client exhaust the machine.
const MAX_PIPES: usize = 64;

/// Most sockets `OpenJSONRPCFdPass` hands out per session. Each is a helper process that lives
/// until the session ends: beyond this a request fails rather than piling up processes.
const MAX_FD_PASS: usize = 16;

/// The image handle that means "not found" in `OpenImageOptional`.
const NOT_FOUND_ID: u64 = 0;

/// Serve one client on `sock` (a connected `SOCK_SEQPACKET` socket) until it sends `Shutdown`
/// or closes its end.
///
/// # Errors
/// The socket fails. Request errors are replies, not errors of this function.
pub fn serve(sock: OwnedFd) -> anyhow::Result<()> {
    let mut server = Server::default();
    let result = server.run(sock.as_fd());
    server.helpers.clear();
    result
}

#[derive(Debug, Default)]
struct Server {
    initialized: bool,
    images: HashMap<u64, Image>,
    next_image: u64,
    pipes: HashMap<u32, JoinHandle<PipeOutcome>>,
    next_pipe: u32,
    helpers: Arc<Helpers>,
    /// The stores of every image opened so far (each once), for `OpenJSONRPCFdPass`.
    stores: Vec<crate::proto::source::Store>,
    /// The helpers whose sockets `OpenJSONRPCFdPass` handed out; they end with the session.
    fd_pass: Vec<crate::client::HelperProcess>,
}

/// What a request asks of the serving loop.
enum Step {
    Reply(Result<Reply, Failure>),
    Shutdown,
}

impl Server {
    fn run(&mut self, sock: BorrowedFd<'_>) -> anyhow::Result<()> {
        use anyhow::Context;
        loop {
            let step = match wire::recv(sock).context("reading the proxy socket")? {
                wire::Incoming::Closed => return Ok(()),
                wire::Incoming::Oversized => Step::Reply(Err(Failure::other(format!(
                    "invalid request: a packet over {} bytes",
                    wire::MAX_MSG_SIZE
                )))),
                wire::Incoming::Packet(bytes) => match wire::parse(&bytes) {
                    Ok(req) => self.handle(&req),
                    Err(f) => Step::Reply(Err(f)),
                },
            };
            let result = match step {
                // As skopeo: no reply; the client waits for the exit status.
                Step::Shutdown => return Ok(()),
                Step::Reply(r) => r,
            };
            let (bytes, keep_fds) = wire::encode(&result);
            let fds = match result {
                Ok(r) if keep_fds => r.fds,
                _ => Vec::new(),
            };
            wire::send(sock, &bytes, &fds).context("writing to the proxy socket")?;
        }
    }

    fn handle(&mut self, req: &Request) -> Step {
        if req.method == "Shutdown" {
            return Step::Shutdown;
        }
        let initialized = self.initialized || req.method == "Initialize";
        Step::Reply(if !initialized {
            Err(Failure::other("client error: must invoke Initialize"))
        } else {
            self.dispatch(req)
        })
    }

    fn dispatch(&mut self, req: &Request) -> Result<Reply, Failure> {
        match req.method.as_str() {
            "Initialize" => {
                arity(req, 0, "[]")?;
                if self.initialized {
                    return Err(Failure::other("already initialized"));
                }
                self.initialized = true;
                Ok(Reply::value(PROTOCOL_VERSION))
            }
            "OpenImage" => self.open_image(req, false),
            "OpenImageOptional" => self.open_image(req, true),
            "CloseImage" => {
                arity(req, 1, "[imageid]")?;
                let id = self.image_id(&req.args[0])?;
                self.images.remove(&id);
                Ok(Reply::default())
            }
            "GetManifest" => {
                let (digest, bytes) = self.image_arg(req)?.manifest()?;
                self.pipe_bytes(Value::String(digest), bytes)
            }
            "GetFullConfig" => {
                let bytes = self.image_arg(req)?.full_config()?;
                self.pipe_bytes(Value::Null, bytes)
            }
            "GetConfig" => {
                let bytes = self.image_arg(req)?.runtime_config()?;
                self.pipe_bytes(Value::Null, bytes)
            }
            "GetLayerInfo" => Ok(Reply::value(self.image_arg(req)?.layer_infos())),
            "GetLayerInfoPiped" => {
                let infos = self.image_arg(req)?.layer_infos();
                let bytes = serde_json::to_vec(&infos).expect("JSON values serialise");
                self.pipe_bytes(Value::Null, bytes)
            }
            "GetBlob" => self.get_blob(req),
            "GetRawBlob" => self.get_raw_blob(req),
            "FinishPipe" => self.finish_pipe(req),
            "OpenJSONRPCFdPass" => self.open_fd_pass(req),
            other => Err(Failure::other(format!("unknown method: {other}"))),
        }
    }

    fn open_image(&mut self, req: &Request, optional: bool) -> Result<Reply, Failure> {
        arity(req, 1, "[imagename]")?;
        let name = str_arg(&req.args[0], "imageref")?;
        let source = image::parse_name(name)?;
        let mut helper = self.helpers.take(&source.store)?;
        let opened = match helper.open(&source.reference) {
            Ok(o) => o,
            Err(e) if optional && is_not_found(&e) => {
                self.helpers.give(&source.store, helper);
                return Ok(Reply::value(NOT_FOUND_ID));
            }
            Err(e) => return Err(Failure::from(e.context(format!("opening image {name:?}")))),
        };
        self.helpers.give(&source.store, helper);
        if !self.stores.contains(&source.store) {
            self.stores.push(source.store.clone());
        }
        let image = Image::new(name, source, opened)?;
        self.next_image += 1;
        self.images.insert(self.next_image, image);
        Ok(Reply::value(self.next_image))
    }

    /// `OpenJSONRPCFdPass` (containers/container-libs PR #651): a helper of this crate for the
    /// store of the images opened so far, and the client's end of its socket, on which the
    /// client speaks `proto/rpc.md` (starting with `Initialize`).
    fn open_fd_pass(&mut self, req: &Request) -> Result<Reply, Failure> {
        arity(req, 0, "[]")?;
        let store = match self.stores.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(Failure::other(
                    "OpenJSONRPCFdPass: no image opened yet, so no store to serve",
                ));
            }
            many => {
                let names: Vec<String> = many.iter().map(ToString::to_string).collect();
                return Err(Failure::other(format!(
                    "OpenJSONRPCFdPass: images of {} stores were opened ({}); a socket serves one",
                    many.len(),
                    names.join(", ")
                )));
            }
        };
        if self.fd_pass.len() >= MAX_FD_PASS {
            return Err(Failure::other(format!(
                "OpenJSONRPCFdPass: {MAX_FD_PASS} sockets already handed out in this session"
            )));
        }
        let config = crate::client::ProxyConfig::new(store.clone());
        let (sock, process) = crate::client::Proxy::spawn_detached(&config).map_err(|e| {
            Failure::from(e.context(format!("OpenJSONRPCFdPass: starting a helper for {store}")))
        })?;
        self.fd_pass.push(process);
        Ok(Reply {
            value: Value::Null,
            pipeid: 0,
            fds: vec![sock],
        })
    }

    fn image_id(&self, v: &Value) -> Result<u64, Failure> {
        let id = uint_arg(v, "imageid")?;
        if id == NOT_FOUND_ID {
            return Err(Failure::other("invalid imageid value of zero"));
        }
        if !self.images.contains_key(&id) {
            return Err(Failure::other(format!("no image {id}")));
        }
        Ok(id)
    }

    /// The image named by the one argument of `req`.
    fn image_arg(&self, req: &Request) -> Result<&Image, Failure> {
        arity(req, 1, "[imageid]")?;
        let id = self.image_id(&req.args[0])?;
        Ok(&self.images[&id])
    }

    fn check_pipe_room(&self) -> Result<(), Failure> {
        if self.pipes.len() >= MAX_PIPES {
            return Err(Failure::other(format!(
                "{MAX_PIPES} pipes are already open: FinishPipe some first"
            )));
        }
        Ok(())
    }

    fn add_pipe(&mut self, handle: JoinHandle<PipeOutcome>) -> u32 {
        // Ids start at 1: the client reads 0 as "no pipe".
        self.next_pipe = self.next_pipe.checked_add(1).unwrap_or(1);
        self.pipes.insert(self.next_pipe, handle);
        self.next_pipe
    }

    fn pipe_bytes(&mut self, value: Value, bytes: Vec<u8>) -> Result<Reply, Failure> {
        self.check_pipe_room()?;
        let (r, w) = blob::new_pipe()?;
        let handle = blob::spawn_bytes(w, bytes)?;
        let pipeid = self.add_pipe(handle);
        Ok(Reply {
            value,
            pipeid,
            fds: vec![r],
        })
    }

    /// The job for blob `digest` of the image in `req.args[0]`, and the blob's size.
    fn blob_job(
        &mut self,
        req: &Request,
        size: Option<u64>,
        verify: bool,
    ) -> Result<(BlobJob, i64), Failure> {
        let id = self.image_id(&req.args[0])?;
        let digest = str_arg(&req.args[1], "blobid")?.to_owned();
        let (source, blob_size) = self.images[&id].blob(&digest)?;
        let helper = match &source {
            BlobSource::Layer { store, .. } => Some(self.helpers.take(store)?),
            _ => None,
        };
        let job = BlobJob {
            source,
            digest,
            size,
            verify,
            helper,
        };
        Ok((job, blob_size))
    }

    fn get_blob(&mut self, req: &Request) -> Result<Reply, Failure> {
        arity(req, 3, "[imageid, digest, size]")?;
        let size = uint_arg(&req.args[2], "size")?;
        self.check_pipe_room()?;
        let (job, blob_size) = self.blob_job(req, Some(size), true)?;
        let (r, w) = blob::new_pipe()?;
        let handle = blob::spawn_blob(w, job, self.helpers.clone())?;
        let pipeid = self.add_pipe(handle);
        Ok(Reply {
            value: blob_size.into(),
            pipeid,
            fds: vec![r],
        })
    }

    fn get_raw_blob(&mut self, req: &Request) -> Result<Reply, Failure> {
        arity(req, 2, "[imageid, digest]")?;
        // Raw blobs have no pipe id, but hold a thread like the others.
        self.check_pipe_room()?;
        let (job, blob_size) = self.blob_job(req, None, false)?;
        let (r, w) = blob::new_pipe()?;
        let (errr, errw) = blob::new_pipe()?;
        blob::spawn_raw(w, errw, job, self.helpers.clone())?;
        Ok(Reply {
            value: blob_size.into(),
            pipeid: 0,
            fds: vec![r, errr],
        })
    }

    fn finish_pipe(&mut self, req: &Request) -> Result<Reply, Failure> {
        arity(req, 1, "[pipeid]")?;
        let raw = uint_arg(&req.args[0], "pipeid")?;
        let handle = u32::try_from(raw)
            .ok()
            .and_then(|id| self.pipes.remove(&id))
            .ok_or_else(|| Failure::other(format!("finishpipe: no active pipe {raw}")))?;
        let (w, result) = handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        // Only now may the client see end-of-file.
        drop(w);
        result.map(|()| Reply::default())
    }
}

/// Does `err` say the image does not exist (the helper's `IMAGE_NOT_FOUND`)?
fn is_not_found(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::client::ProxyError>(),
            Some(crate::client::ProxyError::Rpc(e)) if e.code == crate::proto::rpc::code::IMAGE_NOT_FOUND
        )
    })
}
