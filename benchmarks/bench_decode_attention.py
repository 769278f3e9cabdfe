"""The paged decode attention kernel alone (areal_async/model/paged_decode_triton.py) on the 1.5B shape's layer
(12 query heads, 2 key/value heads of 128, bf16), against the bytes it must read, and two references on the same
rows: SDPA over a dense cache (the earlier slot cache's path: each row's keys contiguous, grouped queries as
rows) and torch's flex_attention in decoding shape (12:2 heads, enable_gqa).

Cases are (batch, cached tokens per row); every row gets its own blocks in shuffled order. The kernel is timed
for each launch configuration (positions per split, warps, pipeline stages) as a CUDA graph replay, median of
--repeats after a warm-up; GB/s counts the keys and values each row holds, read once.

    PYTHONPATH=$PWD python benchmarks/bench_decode_attention.py    # JSON: results/bench_decode_attention.json
"""

from __future__ import annotations

import itertools
import traceback

import torch

from areal_async.model.decoder import rope_cos_sin
from areal_async.model.paged_cache import blocks_for
from areal_async.model.paged_decode_triton import paged_decode_attention
from harness import cuda_ms, script_parser, write_report

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 12, 2, 128, 64
CASES = ((256, 640), (256, 4096), (32, 8192), (256, 2048))
CONFIGS = list(itertools.product((256, 512, 1024, 4096), (4, 8), (2, 3)))  # split tokens, warps, stages


def graph_time_ms(fn, repeats: int) -> float:
    """Median ms of `fn` replayed as a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_ms(graph.replay, repeats)


def case_inputs(batch: int, length: int, generator: torch.Generator) -> dict:
    per_row = blocks_for(length + 1, BLOCK)
    blocks = 1 + batch * per_row
    cache = [torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=generator, device="cuda").bfloat16()
             for _ in range(2)]
    tables = (torch.randperm(blocks - 1, generator=generator, device="cuda") + 1).view(batch, per_row).to(torch.int32)
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=generator, device="cuda").bfloat16()
    q, k, v = (part.view(batch, -1, HEAD_DIM) for part in qkv.split(
        (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM), dim=1))
    lengths = torch.full((batch,), length, dtype=torch.long, device="cuda")
    cos, sin = (t[:, 0, 0] for t in rope_cos_sin(lengths[:, None], HEAD_DIM, 10000.0))
    return {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "cache": cache, "tables": tables, "lengths": lengths,
            "active": torch.ones(batch, dtype=torch.bool, device="cuda")}


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="results/bench_decode_attention.json")
    args = parser.parse_args()
    generator = torch.Generator(device="cuda").manual_seed(0)
    report = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    kv_per_token = 2 * KV_HEADS * HEAD_DIM * 2
    for batch, length in CASES:
        inputs = case_inputs(batch, length, generator)
        gigabytes = batch * length * kv_per_token / 1e9
        rows = {}
        for split_tokens, warps, stages in CONFIGS:
            def kernel():
                paged_decode_attention(inputs["q"], inputs["k"], inputs["v"], inputs["cos"], inputs["sin"],
                                       *inputs["cache"], inputs["tables"], inputs["lengths"], inputs["active"],
                                       HEAD_DIM**-0.5, max(1, split_tokens // BLOCK),
                                       num_warps=warps, num_stages=stages)
            ms = graph_time_ms(kernel, args.repeats)
            rows[f"split{split_tokens}_w{warps}_s{stages}"] = {"ms": ms, "gb_s": gigabytes / ms * 1e3}
        dense_k, dense_v = (torch.randn(batch, KV_HEADS, length + 1, HEAD_DIM, generator=generator,
                                        device="cuda").bfloat16() for _ in range(2))
        grouped = torch.randn(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM, generator=generator,
                              device="cuda").bfloat16()
        sdpa = graph_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(grouped, dense_k, dense_v),
                             args.repeats)
        rows["dense_sdpa"] = {"ms": sdpa, "gb_s": gigabytes / sdpa * 1e3}
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention)
            query = torch.randn(batch, HEADS, 1, HEAD_DIM, generator=generator, device="cuda").bfloat16()
            ms = graph_time_ms(lambda: flex(query, dense_k, dense_v, enable_gqa=True), args.repeats)
            rows["dense_flex_decoding"] = {"ms": ms, "gb_s": gigabytes / ms * 1e3}
        except Exception as error:  # noqa: BLE001 - record why flex decoding does not run on this shape
            traceback.print_exc()
            rows["dense_flex_decoding"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        best = min((key for key in rows if key.startswith("split")), key=lambda key: rows[key]["ms"])
        report["cases"][f"b{batch}_len{length}"] = {"kv_gb": gigabytes, "rows": rows, "best": best}
        print(f"b{batch} len{length} ({gigabytes:.2f} GB): best {best} {rows[best]['ms']:.3f} ms "
              f"({rows[best]['gb_s']:,.0f} GB/s); split512_w4_s2 {rows['split512_w4_s2']['ms']:.3f} ms; dense SDPA "
              f"{sdpa:.3f} ms; flex {rows['dense_flex_decoding'].get('ms', rows['dense_flex_decoding'].get('error'))}",
              flush=True)
        del inputs, dense_k, dense_v
        torch.cuda.empty_cache()
    write_report(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
