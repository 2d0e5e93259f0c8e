#!/usr/bin/env python3
"""GPU check of the low-rank attention kernels (DESIGN 6 and 10): correctness and decode speed.

    python3 bench/gpu_check.py [--out-dir DIR] [--commit SHA]     # on a CUDA machine
    python3 bench/gpu_check.py --dry-run                          # CPU, TRITON_INTERPRET=1, tiny shapes

Sections, each written to the JSON as soon as it is done (a timeout keeps what finished):
  1. device copy bandwidth (a large device-to-device copy: bytes read + written / time);
  2. correctness: Triton kernels vs the PyTorch reference, fp32 / fp16 / bf16, over the shape grid
     of tests/test_lowrank_kernel.py plus long decode contexts (8k, 32k) and a few prefill shapes;
  3. a small sweep of decode launch configs on two cache shapes (the whole autotuning budget);
  4. decode speed for 7B head shapes (32 query heads, head_dim 128, 32 or 8 KV heads) against
     torch SDPA with the flash backend at full rank 128, with time, KV bytes/s, the fraction of
     copy bandwidth and the ratio to SDPA;
  5. quantized caches: decode time of int8 / int4 / mixed codes against fp16 at the same ranks (informative);
  6. latent keys (rope_mode `pre`, latent_rope.py): decode time with pre-RoPE key latents turned in the kernel,
     against the kernel fed keys rebuilt and rotated in full by torch first (what `pre` did before) and against
     plain latents of the same rank (no rotation: the lower bound) (informative); and a joint latent (one cache
     head, issue 13) read in place by each KV head's maps against copying it per KV head first (informative);
  7. end_to_end(): the hook for a model-level check (not implemented here yet).
Targets (PASS/FAIL): at contexts >= 8k the kernel reaches >= 70% of copy bandwidth; at rank 77
(KV ratio 0.6) it takes <= 0.7x the time of full-rank SDPA.
Writes bench/results/gpu-<device>.json and .md, and the same files to --out-dir and to $OUT
when set (the device machine returns only files under $OUT).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, with or without an install
    sys.path.insert(0, str(REPO))
try:
    import eigen_export_plugins  # noqa: F401  (installed: pip install -e .)
except ImportError:             # not installed: plugins/ is the same package under its folder name
    import plugins

    sys.modules["eigen_export_plugins"] = plugins

HEAD_DIM = 128  # OPT-6.7B / Llama-2-7B
NUM_HEADS = 32
TOLERANCES = {"float32": (2e-5, 2e-5), "float16": (2e-3, 2e-3), "bfloat16": (1e-2, 1e-2)}
BANDWIDTH_TARGET = 0.70  # fraction of copy bandwidth at contexts >= 8k
SPEEDUP_TARGET = 0.70  # time at rank 77 / time of full-rank SDPA


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU with TRITON_INTERPRET=1 and tiny shapes: exercises every code path")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="also write the results here (default for --dry-run: a temp dir)")
    parser.add_argument("--commit", default=None, help="git commit of the code (else $GIT_COMMIT)")
    parser.add_argument("--time-budget", type=float, default=240.0,
                        help="seconds after which the speed section skips its remaining shapes")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device, running the CPU dry run instead (--dry-run)")
            # TRITON_INTERPRET must be set before triton is imported: start afresh with it.
            os.execve(sys.executable, [sys.executable, __file__, "--dry-run", *(argv or sys.argv[1:])],
                      dict(os.environ, TRITON_INTERPRET="1"))
    else:
        os.environ["TRITON_INTERPRET"] = "1"
    check = GpuCheck(args)
    return check.run()


class GpuCheck:
    def __init__(self, args):
        import torch
        import triton
        from eigen_export_plugins.lowrank_attention import triton_kernels

        self.args = args
        self.torch, self.triton, self.kernels = torch, triton, triton_kernels
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.t0 = time.time()
        name = "cpu-dry-run" if self.dry else torch.cuda.get_device_name()
        self.slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        self.out_dirs = self._out_dirs()
        self.results = {"meta": self._meta(name)}
        # decode launch config per row alignment (see decode_sweep); the module default until then
        self.decode_configs = {"aligned": triton_kernels.DecodeConfig(),
                               "unaligned": triton_kernels.DecodeConfig()}

    # ------------------------------------------------------------------ plumbing

    def _out_dirs(self) -> list[Path]:
        dirs = []
        if self.dry:
            dirs.append(self.args.out_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_dry_run")
        else:
            dirs.append(REPO / "bench" / "results")
            if self.args.out_dir:
                dirs.append(self.args.out_dir)
        if os.environ.get("OUT"):
            dirs.append(Path(os.environ["OUT"]))
        unique = []
        for d in dirs:
            if d.resolve() not in [u.resolve() for u in unique]:
                unique.append(d)
        return unique

    def _meta(self, device_name: str) -> dict:
        torch = self.torch
        meta = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "commit": self.args.commit or os.environ.get("GIT_COMMIT") or _git_commit(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": device_name,
            "dry_run": self.dry,
            "host": platform.node(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": self.triton.__version__,
            "cuda": torch.version.cuda,
            "settings": {"head_dim": HEAD_DIM, "num_heads": NUM_HEADS, "tolerances": TOLERANCES,
                         "bandwidth_target": BANDWIDTH_TARGET, "speedup_target": SPEEDUP_TARGET,
                         "time_budget_s": self.args.time_budget},
        }
        if not self.dry:
            props = torch.cuda.get_device_properties(0)
            meta.update(sm_count=props.multi_processor_count,
                        compute_capability=f"{props.major}.{props.minor}",
                        memory_gib=round(props.total_memory / 2**30, 1),
                        l2_cache_bytes=getattr(props, "L2_cache_size", None))
        return meta

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.time() - self.t0, 1)
        text = json.dumps(self.results, indent=1, default=str)
        summary = render_markdown(self.results)
        prefix = "dry-run" if self.dry else "gpu"
        for d in self.out_dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{prefix}-{self.slug}.json").write_text(text)
            (d / f"{prefix}-{self.slug}.md").write_text(summary)

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def run(self) -> int:
        meta = self.results["meta"]
        self.log(f"device {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"commit {meta['commit']}")
        sections = [("copy_bandwidth", self.copy_bandwidth), ("correctness", self.correctness),
                    ("decode_sweep", self.decode_sweep), ("decode_speed", self.decode_speed),
                    ("quantized_decode", self.quantized_decode), ("latent_decode", self.latent_decode),
                    ("end_to_end", lambda: end_to_end(self.results))]
        for key, section in sections:
            try:
                self.results[key] = section()
            except Exception as exc:  # keep the other sections' numbers
                import traceback
                traceback.print_exc()
                self.results[key] = {"error": f"{type(exc).__name__}: {exc}"}
            self.save()
        self.results["targets"] = evaluate_targets(self.results)
        self.save()
        for line in target_lines(self.results["targets"]):
            print(line)
        self.log(f"wrote {', '.join(str(d) for d in self.out_dirs)}")
        if self.dry:  # interpreter timings mean nothing: only correctness decides
            print("dry run: the speed targets are not judged on CPU")
            return 0 if self.results["targets"]["correctness"]["pass"] else 1
        return 0 if self.results["targets"]["all_pass"] else 1

    # ------------------------------------------------------------------ timing

    def time_call(self, fns, reps: int = 10) -> dict:
        """Median microseconds per call, cycling through fns (one per copy of the buffers, so a
        small cache is not served from L2). On CUDA: inside a CUDA graph (kernel time, no Python
        launch overhead, as an engine runs it) and eagerly with events (with the overhead)."""
        torch = self.torch
        for fn in fns:
            fn()  # compiles
        if self.dry:
            times = []
            for i in range(3):
                start = time.perf_counter()
                fns[i % len(fns)]()
                times.append((time.perf_counter() - start) * 1e6)
            return {"us": statistics.median(times), "eager_us": statistics.median(times)}
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        eager = []
        for i in range(12):
            start.record()
            fns[i % len(fns)]()
            end.record()
            end.synchronize()
            eager.append(start.elapsed_time(end) * 1e3)
        eager_us = statistics.median(eager)
        calls = max(1, min(200, math.ceil(3000 / max(eager_us, 1.0))))  # ~3 ms per replay
        calls = math.ceil(calls / len(fns)) * len(fns)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for fn in fns:
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(calls):
                    fns[i % len(fns)]()
            graph.replay()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / calls)
            del graph
            return {"us": statistics.median(times), "eager_us": eager_us, "calls_per_graph": calls}
        except Exception as exc:  # graphs unavailable: eager numbers still mean something
            return {"us": eager_us, "eager_us": eager_us, "graph_error": f"{type(exc).__name__}: {exc}"}

    # ------------------------------------------------------------------ 1. copy bandwidth

    def copy_bandwidth(self) -> dict:
        torch = self.torch
        nbytes = (16 << 20) if self.dry else (2 << 30)
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device).random_()
        dst = torch.empty_like(src)
        timing = self.time_call([lambda: dst.copy_(src)], reps=10)
        bandwidth = 2 * nbytes / (timing["us"] * 1e-6)  # read + write
        # A read-only pass, the roofline of decode attention: on an H200 a copy reached 2.77 TB/s
        # while kernels that only read reached 4.4 TB/s, so the copy alone understates the limit.
        halves = src.view(torch.float16)
        read = self.time_call([lambda: torch.sum(halves, dtype=torch.float32)], reps=10)
        read_bandwidth = nbytes / (read["us"] * 1e-6)
        del src, dst, halves
        self.copy_bytes_per_s, self.read_bytes_per_s = bandwidth, read_bandwidth
        self.log(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s, read (sum) bandwidth "
                 f"{read_bandwidth / 1e12:.3f} TB/s ({nbytes >> 20} MiB)")
        return {"bytes": nbytes, "us": timing["us"], "bytes_per_s": bandwidth,
                "method": "dst.copy_(src), (bytes read + written) / median time",
                "read_us": read["us"], "read_bytes_per_s": read_bandwidth,
                "read_method": "torch.sum(fp16 view, dtype=float32), bytes read / median time"}

    # ------------------------------------------------------------------ 2. correctness

    def correctness_grid(self) -> list[dict]:
        # (B, H, H_kv, S, P, r_k, r_v, left_pad, view, chunk_len): as tests/test_lowrank_kernel.py
        small = [
            (1, 4, 4, 1, 0, 8, 8, (), False, None),
            (3, 6, 2, 1, 1, 40, 56, (0, 1, 0), False, None),
            (3, 8, 2, 1, 37, 77, 40, (4, 0, 9), True, None),
            (1, 3, 1, 1, 300, 64, 48, (), False, None),
            (3, 4, 4, 1, 300, 56, 64, (0, 120, 7), False, 32),
            (3, 12, 4, 1, 300, 77, 77, (100, 0, 301), True, 64),
            (1, 4, 4, 7, 0, 8, 16, (), False, None),
            (3, 6, 2, 5, 1, 40, 56, (3, 0, 1), False, None),
            (3, 8, 2, 33, 17, 77, 40, (20, 0, 3), True, None),
            (1, 3, 1, 16, 300, 64, 48, (), False, None),
            (3, 4, 4, 70, 0, 56, 24, (0, 66, 5), False, None),
            (1, 12, 4, 9, 300, 33, 64, (), True, None),
        ]
        if self.dry:
            dtypes_small, long, dtypes_long = ("float32", "float16"), [
                (2, 4, 2, 1, 700, 77, 40, (300, 0), True, None),
                (1, 4, 4, 40, 90, 102, 64, (), False, None)], ("float16",)
        else:
            dtypes_small, dtypes_long = ("float32", "float16", "bfloat16"), ("float16", "bfloat16")
            long = [
                (2, 32, 8, 1, 8191, 77, 64, (1000, 0), True, None),
                (2, 32, 32, 1, 8191, 102, 102, (), False, None),
                (2, 32, 8, 1, 32767, 77, 77, (0, 5000), False, None),
                (1, 32, 32, 1, 32767, 64, 128, (), True, None),
                (2, 32, 8, 512, 0, 77, 64, (100, 0), False, None),
                (1, 32, 32, 128, 4000, 102, 64, (), True, None),
            ]
        grid = [dict(shape=s, dtype=d) for s in small for d in dtypes_small]
        grid += [dict(shape=s, dtype=d) for s in long for d in dtypes_long]
        # quantized caches (kv_codec, issue 15): int8 / int4 codes of both sides, or of the values only (pre mode)
        quantized = [long[0], long[-2]] if not self.dry else long[:1]
        grid += [dict(shape=s, dtype="float16", kv=kv) for s in [small[2], small[7]] + quantized
                 for kv in ("int8", "int4", "v-int4", "mixed")]
        # pre-RoPE key latents turned in the kernel (issue 14 (c)), float and quantized
        grid += [dict(shape=s, dtype=d, kv=kv) for s in [small[2], small[7]] for d in dtypes_small
                 for kv in ("latent", "latent-int4")]
        grid += [dict(shape=s, dtype="float16", kv=kv) for s in quantized for kv in ("latent", "latent-int8")]
        # joint latents (issue 13): one cache head that each KV head's maps read in place, latents wider than a head
        joint = [(2, 16, 2, 1, 700, 180, 160, (300, 0), False, None), (2, 16, 2, 37, 90, 120, 200, (0, 9), True, None)]
        if not self.dry:
            joint += [(8, 16, 2, 1, 8191, 176, 176, (), False, None)]
        grid += [dict(shape=s, dtype=d, kv=kv) for s in joint for d in dtypes_long
                 for kv in ("joint", "joint-int8", "joint-mixed")]
        return grid

    def make_inputs(self, shape, dtype: str, seed: int = 0, kv: str = "float"):
        """q, k, v, mask, scale, latent_keys; kv "int8" / "int4" quantizes k and v (kv_codec), "v-int8" / "v-int4" v
        only; "latent[-int8|-int4]": k holds pre-RoPE key latents (quantized, with v) and q is HEAD_DIM wide;
        "joint[-int8|-int4]": as latent, with ONE cache head (a joint latent) that every KV head's maps read."""
        torch = self.torch
        batch, heads, heads_kv, seq, past, rank_k, rank_v, left_pad, view, _ = shape
        gen = torch.Generator(device=self.device).manual_seed(seed)
        dt = getattr(torch, dtype)
        total = past + seq
        joint = kv.startswith("joint")
        latent = joint or kv.startswith("latent")
        kv = kv.removeprefix("joint").removeprefix("latent").removeprefix("-") or "float"
        maps_heads, heads_kv = heads_kv, 1 if joint else heads_kv
        width = HEAD_DIM if latent else rank_k

        def randn(*size):
            return torch.randn(*size, generator=gen, device=self.device).to(dt)

        if view:
            q = randn(batch, seq, heads, width).transpose(1, 2)  # [B, H, S, r_k or HEAD_DIM]
            k = randn(batch, heads_kv, total + 11, rank_k)[:, :, :total]  # view into a larger cache
            v = randn(batch, heads_kv, total + 11, rank_v)[:, :, :total]
        else:
            q = randn(batch, heads, seq, width)
            k = randn(batch, heads_kv, total, rank_k)
            v = randn(batch, heads_kv, total, rank_v)
        mask = torch.ones(batch, total, dtype=torch.int64, device=self.device)
        for row, pad in enumerate(left_pad):
            mask[row, :pad] = 0
        if kv != "float":
            kv_dtype = kv.removeprefix("v-")
            v = self.quantized(v, kv_dtype)
            k = k if kv.startswith("v-") else self.quantized(k, kv_dtype)
        latent_keys = self.latent_keys(maps_heads, rank_k, mask, joint=joint) if latent else None
        return q, k, v, mask, 1.0 / math.sqrt(HEAD_DIM), latent_keys

    def latent_keys(self, heads_kv: int, rank_k: int, mask, seed: int = 1, joint: bool = False):
        """Latent-key tables of an orthonormal random key basis per KV head (joint: one over all KV heads' features,
        in H_kv blocks), Llama-2's frequencies and each key's position over the real tokens of mask."""
        from eigen_export_plugins.lowrank_attention.latent_rope import LatentKeys, latent_key_tables
        torch = self.torch
        gen = torch.Generator().manual_seed(seed)
        if joint:
            width = heads_kv * HEAD_DIM
            basis = torch.linalg.qr(torch.randn(width, width, generator=gen))[0][:, :rank_k]
            basis = basis.reshape(heads_kv, HEAD_DIM, rank_k)
        else:
            basis = torch.linalg.qr(torch.randn(heads_kv, HEAD_DIM, HEAD_DIM, generator=gen))[0][..., :rank_k]
        inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        tables = [t.to(self.device) for t in latent_key_tables(basis, inv_freq, HEAD_DIM, "half")]
        return LatentKeys(*tables, (mask.cumsum(-1) - 1).clamp(min=0))

    def check_case(self, shape, dtype: str, config=None, kv: str = "float") -> dict:
        from eigen_export_plugins.lowrank_attention.reference import lowrank_attention_reference
        q, k, v, mask, scale, latent_keys = self.make_inputs(shape, dtype, kv=kv)
        got = self.kernels.lowrank_attention(q, k, v, mask, scale, latent_keys=latent_keys,
                                             decode_config=config).float()
        want = lowrank_attention_reference(q, k, v, mask, scale, latent_keys).float()
        atol, rtol = TOLERANCES[dtype]
        err = (got - want).abs()
        record = {"shape": dict(zip(("B", "H", "H_kv", "S", "P", "r_k", "r_v", "left_pad", "view",
                                     "chunk_len"), shape)),
                  "dtype": dtype, "kv": kv, "max_abs_err": err.max().item(),
                  "max_ref_abs": want.abs().max().item(),
                  "finite": bool(self.torch.isfinite(got).all()),
                  "atol": atol, "rtol": rtol}
        record["pass"] = record["finite"] and bool((err <= atol + rtol * want.abs()).all())
        return record

    def correctness(self) -> dict:
        DecodeConfig = self.kernels.DecodeConfig
        grid = [(item["shape"], item["dtype"],
                 DecodeConfig(block_n=16, chunk_len=item["shape"][-1]) if item["shape"][-1] else None,
                 item.get("kv", "float"))
                for item in self.correctness_grid()]
        # the register-prefetch decode variant, which the sweep may choose
        grid += [((3, 12, 4, 1, 300, 77, 77, (100, 0, 301), True, None), "float32",
                  DecodeConfig(block_n=32, chunk_len=64, prefetch=True), "float"),
                 ((2, 8, 2, 1, 1000, 77, 64, (300, 0), True, None), "float16",
                  DecodeConfig(block_n=64, num_warps=8, prefetch=True), "float")]
        cases = []
        for shape, dtype, config, kv in grid:
            try:
                record = self.check_case(shape, dtype, config, kv)
                record["config"] = _config_dict(config) if config else None
            except Exception as exc:
                record = {"shape": shape, "dtype": dtype, "kv": kv, "pass": False,
                          "config": _config_dict(config) if config else None,
                          "error": f"{type(exc).__name__}: {exc}"}
            cases.append(record)
            if not record["pass"]:
                self.log(f"correctness FAIL {shape} {dtype}: {record.get('error', record.get('max_abs_err'))}")
        worst = {}
        for record in cases:
            if "max_abs_err" in record:
                worst[record["dtype"]] = max(worst.get(record["dtype"], 0.0), record["max_abs_err"])
        passed = sum(r["pass"] for r in cases)
        self.log(f"correctness {passed}/{len(cases)} pass; max abs error by dtype {worst}")
        return {"cases": cases, "passed": passed, "total": len(cases), "max_abs_err": worst,
                "all_pass": passed == len(cases)}

    # ------------------------------------------------------------------ 3. decode config sweep

    def decode_sweep(self) -> dict:
        """A few launch configs on two cache shapes, one per row alignment: a rank that is a
        multiple of 16 loads rows as 16-byte vectors (cp.async pipelined), any other rank loads
        2-byte scalars, so each class gets its own best config, used in the speed section."""
        DecodeConfig = self.kernels.DecodeConfig
        if self.dry:
            shapes = {"unaligned": (2, 2, 256, 13), "aligned": (1, 4, 512, 16)}
            configs = [DecodeConfig(block_n=16), DecodeConfig(block_n=32, min_chunk=64, prefetch=True)]
        else:
            # (B, H_kv, context, rank): GQA at rank 77, MHA at rank 64; both far past L2
            shapes = {"unaligned": (8, 8, 16384, 77), "aligned": (1, 32, 32768, 64)}
            configs = [DecodeConfig(block_n=64, num_warps=4, num_stages=3),
                       DecodeConfig(block_n=64, num_warps=4, num_stages=2),
                       DecodeConfig(block_n=64, num_warps=8, num_stages=3),
                       DecodeConfig(block_n=128, num_warps=8, num_stages=3),
                       DecodeConfig(block_n=32, num_warps=4, num_stages=4),
                       DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=8),
                       DecodeConfig(block_n=64, num_warps=8, num_stages=3, prefetch=True),
                       DecodeConfig(block_n=32, num_warps=4, num_stages=3, prefetch=True)]
        report = {"shapes": {}, "best": {}, "best_correctness": {}}
        for kind, (batch, heads_kv, context, rank) in shapes.items():
            q, k, v = self.decode_buffers(batch, heads_kv, context, rank, rank, copies=1)[0]
            rows = []
            for config in configs:
                row = {"config": _config_dict(config)}
                try:
                    row["us"] = self.time_call([self.ours(q, k, v, None, config)])["us"]
                except Exception as exc:  # e.g. out of shared memory for a large tile
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
            del q, k, v
            timed = [r for r in rows if "us" in r]
            if timed:
                self.decode_configs[kind] = DecodeConfig(**min(timed, key=lambda r: r["us"])["config"])
            chosen = self.decode_configs[kind]
            report["shapes"][kind] = {"B": batch, "H_kv": heads_kv, "context": context, "rank": rank,
                                      "configs": rows}
            report["best"][kind] = _config_dict(chosen)
            # the chosen config must also be right: check it on its sweep shape, with padding
            shape = (batch, NUM_HEADS if not self.dry else 4, heads_kv, 1, context - 1, rank, rank,
                     (context // 3,), True, None)
            report["best_correctness"][kind] = self.check_case(shape, "float16", chosen)
            self.log(f"decode sweep {kind}: best {_config_dict(chosen)}, correct "
                     f"{report['best_correctness'][kind]['pass']}")
        return report

    # ------------------------------------------------------------------ 5. quantized caches

    @staticmethod
    def quantized(t, kv_dtype: str):
        """t's codes as kv_codec.Quantized; mixed: a quarter of the numbers 8-bit, half 4-bit, the rest 2-bit."""
        from eigen_export_plugins.lowrank_attention.kv_codec import Quantized, encode
        rank = t.shape[-1]
        counts = (rank // 4, rank // 2, rank - rank // 4 - rank // 2) if kv_dtype == "mixed" else None
        return Quantized(*encode(t, kv_dtype, counts), kv_dtype, rank, counts)

    def quantized_decode(self) -> dict:
        """Decode time with an fp16 cache against int8 / int4 / mixed (4 bits on average: a quarter of the numbers
        8-bit, half 4-bit, a quarter 2-bit) codes of the same ranks (issue 15; informative, no target): the kernel
        is bound by the bytes it reads, which int8 halves and int4 quarters (+2 bytes of scale per vector)."""
        torch = self.torch
        batch, heads_kv, rank_k, rank_v = (8, 8, 77, 64) if not self.dry else (1, 2, 13, 8)
        contexts = (8191, 32767) if not self.dry else (64,)
        rows = []
        for context in contexts:
            q, k, v = self.decode_buffers(batch, heads_kv, context, rank_k, rank_v, copies=1)[0]
            mask = torch.ones(batch, context, dtype=torch.int64, device=self.device)
            row = {"B": batch, "H_kv": heads_kv, "context": context, "r_k": rank_k, "r_v": rank_v}
            for kv in ("fp16", "int8", "int4", "mixed"):
                kk, vv = (k, v) if kv == "fp16" else (self.quantized(k, kv), self.quantized(v, kv))
                row[kv] = self.time_call([self.ours(q, kk, vv, mask)])
            for kv in ("int8", "int4", "mixed"):
                row[f"{kv}_vs_fp16"] = row[kv]["us"] / row["fp16"]["us"]
            rows.append(row)
            self.log(f"quantized decode ctx {context}: fp16 {row['fp16']['us']:.1f} us, int8 x{row['int8_vs_fp16']:.2f},"
                     f" int4 x{row['int4_vs_fp16']:.2f}, mixed x{row['mixed_vs_fp16']:.2f}")
        return {"rows": rows}

    # ------------------------------------------------------------------ 6. latent keys

    def latent_decode(self) -> dict:
        """Decode time of rope_mode `pre` three ways at 7B head shapes (issue 14 (c); informative, no target):
        latent keys turned in the kernel; keys rebuilt and rotated in full by torch, then the kernel at head_dim
        (the plugin graph's `pre` before); plain latents of the same rank without rotation (the floor)."""
        torch = self.torch
        batch, heads_kv, rank_k, rank_v = (8, 8, 64, 64) if not self.dry else (1, 2, 16, 16)
        contexts = (8191, 32767) if not self.dry else (64,)
        rows = []
        for context in contexts:
            _, k, v = self.decode_buffers(batch, heads_kv, context, rank_k, rank_v, copies=1)[0]
            heads = NUM_HEADS if not self.dry else 4
            q_full = torch.randn(batch, heads, 1, HEAD_DIM, device=self.device, dtype=torch.float16)
            q_latent = torch.randn(batch, heads, 1, rank_k, device=self.device, dtype=torch.float16)
            mask = torch.ones(batch, context, dtype=torch.int64, device=self.device)
            latent_keys = self.latent_keys(heads_kv, rank_k, mask)
            scale = 1.0 / math.sqrt(HEAD_DIM)
            config = self.decode_configs["aligned"]

            def in_kernel():
                return self.kernels.lowrank_attention(q_full, k, v, mask, scale, latent_keys=latent_keys,
                                                      decode_config=config)

            def rebuilt():
                keys = latent_keys.keys(k).to(torch.float16)          # what the graph built before the node
                return self.kernels.lowrank_attention(q_full, keys, v, mask, scale, decode_config=config)

            row = {"B": batch, "H_kv": heads_kv, "context": context, "r_k": rank_k, "r_v": rank_v,
                   "latent_in_kernel": self.time_call([in_kernel]),
                   "rebuilt_then_kernel": self.time_call([rebuilt]),
                   "plain_latent": self.time_call([self.ours(q_latent, k, v, mask, config)])}
            row["in_kernel_vs_rebuilt"] = row["latent_in_kernel"]["us"] / row["rebuilt_then_kernel"]["us"]
            row["in_kernel_vs_plain"] = row["latent_in_kernel"]["us"] / row["plain_latent"]["us"]
            rows.append(row)
            self.log(f"latent decode ctx {context}: in kernel {row['latent_in_kernel']['us']:.1f} us, "
                     f"x{row['in_kernel_vs_rebuilt']:.2f} of rebuilt-then-kernel, x{row['in_kernel_vs_plain']:.2f} of "
                     "plain latents")
            del k, v, latent_keys
        return {"rows": rows, "joint": self.joint_decode(batch, contexts)}

    def joint_decode(self, batch: int, contexts) -> list:
        """A joint latent (issue 13: one cache head, H_kv x head_dim <= 256 features) read in place by each KV head's
        maps, against the copy per KV head that the plugin graph made in front of the node before (an Expand,
        materialised every step)."""
        torch = self.torch
        heads_kv, rank = (2, 176) if not self.dry else (2, 32)
        heads = NUM_HEADS if not self.dry else 4
        scale, config, rows = 1.0 / math.sqrt(HEAD_DIM), self.decode_configs["aligned"], []
        for context in contexts:
            k, v = (torch.randn(batch, 1, context, rank, device=self.device, dtype=torch.float16) for _ in range(2))
            q = torch.randn(batch, heads, 1, HEAD_DIM, device=self.device, dtype=torch.float16)
            mask = torch.ones(batch, context, dtype=torch.int64, device=self.device)
            latent_keys = self.latent_keys(heads_kv, rank, mask, joint=True)

            def in_place():
                return self.kernels.lowrank_attention(q, k, v, mask, scale, latent_keys=latent_keys,
                                                      decode_config=config)

            def copied():
                k_all, v_all = (t.expand(batch, heads_kv, context, rank).contiguous() for t in (k, v))
                return self.kernels.lowrank_attention(q, k_all, v_all, mask, scale, latent_keys=latent_keys,
                                                      decode_config=config)

            row = {"B": batch, "H": heads, "H_kv": heads_kv, "context": context, "rank": rank,
                   "in_place": self.time_call([in_place]), "copied_per_kv_head": self.time_call([copied])}
            row["in_place_vs_copied"] = row["in_place"]["us"] / row["copied_per_kv_head"]["us"]
            rows.append(row)
            self.log(f"joint latent decode ctx {context}: in place {row['in_place']['us']:.1f} us, "
                     f"x{row['in_place_vs_copied']:.2f} of copying it per KV head first")
            del k, v, latent_keys
        return rows

    # ------------------------------------------------------------------ 4. decode speed

    def decode_buffers(self, batch, heads_kv, context, rank_k, rank_v, copies, heads=None):
        torch = self.torch
        heads = heads or (NUM_HEADS if not self.dry else 4)
        out = []
        for _ in range(copies):
            q = torch.randn(batch, heads, 1, rank_k, device=self.device, dtype=torch.float16)
            k = torch.randn(batch, heads_kv, context, rank_k, device=self.device, dtype=torch.float16)
            v = torch.randn(batch, heads_kv, context, rank_v, device=self.device, dtype=torch.float16)
            out.append((q, k, v))
        return out

    def ours(self, q, k, v, mask, config=None):
        scale = 1.0 / math.sqrt(HEAD_DIM)
        if config is None:
            config = self.decode_configs["aligned" if k.shape[-1] % 16 == 0 else "unaligned"]
        return lambda: self.kernels.lowrank_attention(q, k, v, mask, scale, decode_config=config)

    def sdpa(self, q, k, v, gqa_mode: str):
        torch = self.torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.MATH if self.dry else SDPBackend.FLASH_ATTENTION
        functional = torch.nn.functional

        def call():
            with sdpa_kernel(backend):
                if gqa_mode == "enable_gqa":
                    return functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                return functional.scaled_dot_product_attention(q, k, v)
        return call

    def sdpa_gqa_mode(self, heads_kv: int) -> str:
        """'native' for MHA; for GQA 'enable_gqa' if the flash backend takes it, else 'expanded'."""
        if heads_kv == (NUM_HEADS if not self.dry else 4):
            return "native"
        if getattr(self, "_gqa_mode", None) is None:
            q, k, v = self.decode_buffers(1, heads_kv, 64, HEAD_DIM if not self.dry else 16,
                                          HEAD_DIM if not self.dry else 16, copies=1)[0]
            try:
                self.sdpa(q, k, v, "enable_gqa")()
                self._gqa_mode = "enable_gqa"
            except Exception as exc:  # older torch, or flash without GQA: repeat the KV heads
                self._gqa_mode = "expanded"
                self._gqa_error = f"{type(exc).__name__}: {exc}"[:300]
        return self._gqa_mode

    def decode_speed(self) -> dict:
        torch = self.torch
        if self.dry:
            full, ranks = 16, {"1.0": 16, "0.8": 13, "0.6": 10, "0.6@16": 16, "0.5": 8}
            heads_kv_list, contexts, batches = (4, 2), (64,), (1,)
        else:
            # 0.6@16: rank 77 rounded up to a multiple of 16 (DESIGN 3.3c): aligned rows load vectorised
            full, ranks = HEAD_DIM, {"1.0": 128, "0.8": 102, "0.6": 77, "0.6@16": 80, "0.5": 64}
            # the contexts the targets judge first, so a time-budget cut loses the least
            heads_kv_list, contexts, batches = (32, 8), (8192, 32768, 1024, 16384, 4096), (1, 8, 32)
        l2 = self.results["meta"].get("l2_cache_bytes") or (50 << 20)
        rows, skipped = [], []
        for context in contexts:
            for heads_kv in heads_kv_list:
                gqa_mode = self.sdpa_gqa_mode(heads_kv)
                for batch in batches:
                    label = f"H_kv={heads_kv} ctx={context} B={batch}"
                    if time.time() - self.t0 > self.args.time_budget:
                        skipped.append({"case": label, "why": "time budget"})
                        continue
                    full_bytes = batch * heads_kv * context * 2 * full * 2
                    copies = 1 if self.dry else max(1, min(8, math.ceil(4 * l2 / full_bytes)))
                    need = full_bytes * copies * (2 if gqa_mode != "expanded" else 5)
                    if not self.dry and need > 0.85 * torch.cuda.mem_get_info()[0]:
                        skipped.append({"case": label, "why": f"needs {need / 2**30:.1f} GiB"})
                        continue
                    try:
                        row = self.speed_row(batch, heads_kv, context, full, ranks, copies, gqa_mode)
                    except (torch.cuda.OutOfMemoryError, MemoryError):
                        skipped.append({"case": label, "why": "out of memory"})
                        continue
                    finally:
                        if not self.dry:
                            torch.cuda.empty_cache()
                    rows.append(row)
                    r77 = row["ours"]["0.6"]
                    self.log(f"{label}: sdpa {row['sdpa']['us']:.1f} us, r77 {r77['us']:.1f} us "
                             f"= {r77['ratio_to_sdpa']:.2f}x, {_fmt(r77.get('bw_fraction'), '.2f')} "
                             "of copy bw")
        return {"rows": rows, "skipped": skipped,
                "decode_configs": {k: _config_dict(c) for k, c in self.decode_configs.items()},
                "sdpa_backend": "MATH (dry run)" if self.dry else "FLASH_ATTENTION",
                "sdpa_gqa_mode": getattr(self, "_gqa_mode", "native"),
                "sdpa_gqa_error": getattr(self, "_gqa_error", None),
                "timing": "median us per call inside a CUDA graph (kernel time); eager_us = single "
                          "eager call with CUDA events, Python launch overhead included; buffers "
                          "cycled over `copies` so a small cache is not read from L2",
                "bytes": "KV bytes read = B * H_kv * context * (r_k + r_v) * 2 (fp16)"}

    def speed_row(self, batch, heads_kv, context, full, ranks, copies, gqa_mode) -> dict:
        torch = self.torch
        copy_bw = getattr(self, "copy_bytes_per_s", None)
        heads = NUM_HEADS if not self.dry else 4
        row = {"batch": batch, "heads_kv": heads_kv, "context": context, "copies": copies}
        # SDPA, fp16 full rank; 'expanded' repeats the KV heads beforehand (outside the timing)
        buffers = self.decode_buffers(batch, heads_kv, context, full, full, copies)
        if gqa_mode == "expanded":
            group = heads // heads_kv
            buffers = [(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
                       for q, k, v in buffers]
        sdpa_time = self.time_call([self.sdpa(q, k, v, gqa_mode) for q, k, v in buffers])
        sdpa_bytes = buffers[0][1].numel() * 2 * 2
        row["sdpa"] = {**sdpa_time, "kv_bytes": sdpa_bytes, "gqa_mode": gqa_mode,
                       "bytes_per_s": sdpa_bytes / (sdpa_time["us"] * 1e-6)}
        if copy_bw:
            row["sdpa"]["bw_fraction"] = row["sdpa"]["bytes_per_s"] / copy_bw
            row["sdpa"]["read_bw_fraction"] = row["sdpa"]["bytes_per_s"] / self.read_bytes_per_s
        del buffers
        row["ours"] = {}
        for ratio, rank in ranks.items():
            buffers = self.decode_buffers(batch, heads_kv, context, rank, rank, copies)
            variants = {ratio: None}
            if ratio == "0.6":  # the price of the padding mask (int64, as the ONNX graph feeds it)
                variants[ratio + "+mask"] = torch.ones(batch, context, dtype=torch.int64,
                                                       device=self.device)
            for key, mask in variants.items():
                timing = self.time_call([self.ours(q, k, v, mask) for q, k, v in buffers])
                kv_bytes = batch * heads_kv * context * 2 * rank * 2
                entry = {**timing, "rank": rank, "kv_bytes": kv_bytes,
                         "bytes_per_s": kv_bytes / (timing["us"] * 1e-6),
                         "ratio_to_sdpa": timing["us"] / sdpa_time["us"]}
                if copy_bw:
                    entry["bw_fraction"] = entry["bytes_per_s"] / copy_bw
                    entry["read_bw_fraction"] = entry["bytes_per_s"] / self.read_bytes_per_s
                row["ours"][key] = entry
            del buffers
        return row


def end_to_end(results: dict) -> dict:
    """HOOK (lead): model-level check, e.g. a folded 7B-shaped model's decode step through the
    plugin vs the PyTorch path, tokens/s and logits error. Gets every result so far; returns a
    JSON-serialisable dict stored as results["end_to_end"]. Not implemented in this script yet."""
    return {"skipped": "not implemented in this script yet"}


# ---------------------------------------------------------------------- targets and the summary


def evaluate_targets(results: dict) -> dict:
    speed = results.get("decode_speed", {})
    rows = speed.get("rows", []) if isinstance(speed, dict) else []
    long_rows = [(r, r["ours"]["0.6"]) for r in rows if r["context"] >= 8192 and "0.6" in r["ours"]]
    bandwidth = [{"case": _row_label(r), "rank": e["rank"], "bw_fraction": e.get("bw_fraction")}
                 for r in rows if r["context"] >= 8192 for e in r["ours"].values()]
    speedup = [{"case": _row_label(r), "ratio_to_sdpa": e["ratio_to_sdpa"]} for r, e in
               [(r, r["ours"]["0.6"]) for r in rows if "0.6" in r["ours"]]]
    bw_fracs = [b["bw_fraction"] for b in bandwidth if b["bw_fraction"] is not None]
    ratios = [s["ratio_to_sdpa"] for s in speedup]
    correctness = results.get("correctness", {})
    targets = {
        "correctness": {"pass": bool(correctness.get("all_pass")),
                        "detail": f"{correctness.get('passed')}/{correctness.get('total')} cases"},
        "bandwidth": {
            "target": f">= {BANDWIDTH_TARGET:.0%} of copy bandwidth at contexts >= 8k (every rank, B, H_kv)",
            "pass": bool(bw_fracs) and min(bw_fracs) >= BANDWIDTH_TARGET,
            "passed": sum(f >= BANDWIDTH_TARGET for f in bw_fracs), "total": len(bw_fracs),
            "worst": min(bandwidth, key=lambda b: b["bw_fraction"] or 0) if bandwidth else None,
            "median": statistics.median(bw_fracs) if bw_fracs else None,
            "rank77_median": statistics.median([e.get("bw_fraction") or 0 for _, e in long_rows])
            if long_rows else None,
        },
        "speedup": {
            "target": f"rank 77 (0.6x) time <= {SPEEDUP_TARGET}x full-rank SDPA (every B, H_kv, context)",
            "pass": bool(ratios) and max(ratios) <= SPEEDUP_TARGET,
            "passed": sum(x <= SPEEDUP_TARGET for x in ratios), "total": len(ratios),
            "worst": max(speedup, key=lambda s: s["ratio_to_sdpa"]) if speedup else None,
            "median": statistics.median(ratios) if ratios else None,
            "at_8k_plus": _pass_count([r for r, _ in long_rows], SPEEDUP_TARGET),
        },
    }
    targets["all_pass"] = all(t["pass"] for t in targets.values() if isinstance(t, dict))
    return targets


def _pass_count(rows, limit) -> str:
    ratios = [r["ours"]["0.6"]["ratio_to_sdpa"] for r in rows]
    return f"{sum(x <= limit for x in ratios)}/{len(ratios)}"


def target_lines(targets: dict) -> list[str]:
    lines = []
    for key in ("correctness", "bandwidth", "speedup"):
        t = targets[key]
        verdict = "PASS" if t["pass"] else "FAIL"
        detail = t.get("detail") or f"{t['passed']}/{t['total']} cases; worst {t['worst']}; median {t['median']}"
        lines.append(f"{verdict} {key}: {t.get('target', '')} [{detail}]")
    return lines


def _row_label(row) -> str:
    return f"H_kv={row['heads_kv']} B={row['batch']} ctx={row['context']}"


def _config_dict(config) -> dict:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def _git_commit() -> str:
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    out = [f"# Low-rank attention GPU check: {meta['device']}", "",
           f"commit `{meta['commit']}`, {meta['date_utc']}, torch {meta['torch']}, "
           f"triton {meta['triton']}, CUDA {meta['cuda']}, {meta.get('elapsed_s')} s"
           + (" — DRY RUN on CPU (interpreter): numbers mean nothing" if meta["dry_run"] else ""), ""]
    if "targets" in results:
        out += ["## Targets", ""] + [f"- {line}" for line in target_lines(results["targets"])] + [""]
    copy = results.get("copy_bandwidth", {})
    if "bytes_per_s" in copy:
        out += [f"Device copy bandwidth: {copy['bytes_per_s'] / 1e12:.3f} TB/s (read + write); "
                f"read-only (sum) bandwidth: {_fmt(copy.get('read_bytes_per_s', 0) / 1e12, '.3f')} TB/s. "
                "`bw frac` columns are KV bytes/s over the copy bandwidth (the target's measure).", ""]
    corr = results.get("correctness", {})
    if "cases" in corr:
        out += ["## Correctness (Triton vs PyTorch reference)", "",
                f"{corr['passed']}/{corr['total']} cases pass. Max abs error by dtype: "
                + ", ".join(f"{k} {v:.2e}" for k, v in corr["max_abs_err"].items()), "",
                "| B | H | H_kv | S | P | r_k | r_v | dtype | max abs err | pass |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for c in corr["cases"]:
            s = c["shape"]
            if isinstance(s, dict):
                out.append(f"| {s['B']} | {s['H']} | {s['H_kv']} | {s['S']} | {s['P']} | {s['r_k']} | "
                           f"{s['r_v']} | {c['dtype']} | {_fmt(c.get('max_abs_err'), '.2e')} | "
                           f"{'yes' if c['pass'] else 'NO'} |")
            else:
                out.append(f"| {s} | | | | | | | {c['dtype']} | {c.get('error')} | NO |")
        out.append("")
    sweep = results.get("decode_sweep", {})
    if "best" in sweep:
        out += ["## Decode launch configs (block_n / warps / stages / programs per SM [/ prefetch]: us)", ""]
        for kind, shape in sweep["shapes"].items():
            tried = "; ".join(f"{r['config']['block_n']}/{r['config']['num_warps']}/"
                              f"{r['config']['num_stages']}/{r['config']['programs_per_sm']}"
                              f"{'/prefetch' if r['config'].get('prefetch') else ''}: "
                              f"{_fmt(r.get('us'))}" for r in shape["configs"])
            out.append(f"- {kind} rows (B={shape['B']}, H_kv={shape['H_kv']}, ctx={shape['context']}, "
                       f"r={shape['rank']}): chosen `{sweep['best'].get(kind)}`; tried {tried}")
        out.append("")
    speed = results.get("decode_speed", {})
    if "rows" in speed:
        out += ["## Decode speed (S = 1, 32 query heads, fp16)", "",
                f"SDPA: {speed['sdpa_backend']} at rank 128, GQA via `{speed['sdpa_gqa_mode']}`. "
                f"{speed['timing']}.", "",
                "| H_kv | B | ctx | SDPA us | r128 us | r102 us | r77 us | r77+mask us | r80 us | r64 us "
                "| r77 / SDPA | r80 / SDPA | r77 bw frac | r80 bw frac | r64 bw frac | SDPA bw frac |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(speed["rows"], key=lambda r: (r["heads_kv"], r["context"], r["batch"])):
            o = r["ours"]
            out.append(
                f"| {r['heads_kv']} | {r['batch']} | {r['context']} | {r['sdpa']['us']:.1f} | "
                + " | ".join(_fmt(o.get(k, {}).get("us"))
                             for k in ("1.0", "0.8", "0.6", "0.6+mask", "0.6@16", "0.5"))
                + f" | {_fmt(o.get('0.6', {}).get('ratio_to_sdpa'), '.2f')}"
                + f" | {_fmt(o.get('0.6@16', {}).get('ratio_to_sdpa'), '.2f')}"
                + f" | {_fmt(o.get('0.6', {}).get('bw_fraction'), '.2f')}"
                + f" | {_fmt(o.get('0.6@16', {}).get('bw_fraction'), '.2f')}"
                + f" | {_fmt(o.get('0.5', {}).get('bw_fraction'), '.2f')}"
                + f" | {_fmt(r['sdpa'].get('bw_fraction'), '.2f')} |")
        if speed.get("skipped"):
            out += ["", "Skipped: " + "; ".join(f"{s['case']} ({s['why']})" for s in speed["skipped"])]
        out.append("")
    e2e = results.get("end_to_end")
    if e2e is not None:
        out += ["## End to end", "", f"`{json.dumps(e2e)}`", ""]
    errors = [f"{k}: {v['error']}" for k, v in results.items() if isinstance(v, dict) and "error" in v]
    if errors:
        out += ["## Section errors", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
