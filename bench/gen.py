#!/usr/bin/env python3
"""Writes one synthetic layer tree for the benchmark image.

usage: gen.py DIR LAYER_INDEX SCALE
Deterministic (seeded) content shaped like a developer image: many small source files, some
medium libraries and a few large model files. Random bytes so nothing dedups or compresses away.
"""
import os
import random
import sys

root, layer, scale = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rng = random.Random(layer)
# (directory, count, min size, max size) per layer kind; sizes in bytes.
KINDS = [
    ("usr/lib/python3/site-packages/pkg{}", 32000, 200, 24000),
    ("usr/share/node_modules/mod{}", 32000, 100, 8000),
    ("usr/lib/x86_64-linux-gnu/lib{}", 2000, 50000, 1500000),
    ("opt/models/m{}", 6, 60_000_000, 140_000_000),
    ("srv/assets/a{}", 26000, 10, 4000),
]
kind = KINDS[layer % len(KINDS)]
pattern, count, lo, hi = kind
count = max(1, int(count * scale))
blob = os.urandom(1 << 22)
for i in range(count):
    d = os.path.join(root, pattern.format(i // 200))
    os.makedirs(d, exist_ok=True)
    size = int(rng.uniform(lo, hi) * (scale if hi > 10_000_000 else 1))
    path = os.path.join(d, f"f{i}.dat")
    with open(path, "wb") as f:
        left = size
        while left > 0:
            off = rng.randrange(0, len(blob) - 1)
            chunk = blob[off:off + min(left, len(blob) - off)]
            f.write(chunk)
            left -= len(chunk)
os.makedirs(os.path.join(root, "usr/bin"), exist_ok=True)
with open(os.path.join(root, "usr/bin", f"tool{layer}"), "w") as f:
    f.write("#!/bin/sh\necho layer %d\n" % layer)
