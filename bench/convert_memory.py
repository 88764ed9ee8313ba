"""Peak memory and time of convert.load for a random checkpoint of a preset's shape (default gpt2, 124M).

    python bench/convert_memory.py [--preset gpt2] [--to hf|llmc|reference] [--dtype float32|bfloat16]

Writes a random model in the chosen layout to a temporary directory, then loads it in a fresh process and
reports, above that process's memory after imports: the anonymous memory held after loading (the params) and
the peak RSS, which also counts the pages of a memory-mapped checkpoint file (llm.c, torch) read during conversion.
Linux only (reads /proc/self/status).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from flags import FlagParser  # bench/flags.py: the package's flag parser

MEASURE = """
import json, sys, time
import jax, jax.numpy as jnp
import gpt2_jax.checkpoint, gpt2_jax.weight_files
from gpt2_jax import convert
try:
    import torch  # imported before the baseline: its ~100 MiB are not the converter's
except ImportError:
    pass
def status(key):  # kB -> bytes, from Linux's /proc/self/status
    return 1024 * int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1])
jnp.zeros(1).block_until_ready()
base_rss, base_anon, start = status("VmRSS"), status("RssAnon"), time.perf_counter()
cfg, params = convert.load(sys.argv[1], jnp.dtype(sys.argv[2]))
jax.block_until_ready(params)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": status("VmHWM") - base_rss,
                  "anon": status("RssAnon") - base_anon,
                  "params_bytes": sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


def main() -> None:
    parser = FlagParser(description=__doc__)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--to", default="hf", choices=("hf", "llmc", "reference"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax
    import numpy as np

    from gpt2_jax import convert
    from gpt2_jax.config import ModelConfig

    cfg = ModelConfig.from_preset(args.preset)
    if args.to == "reference":
        cfg = ModelConfig.from_preset(args.preset, tie_embeddings=False, lm_head_bias=True)
    rng = np.random.default_rng(0)
    params = convert.unflatten({k: rng.standard_normal(s, np.float32) * 0.02
                                for k, s in convert.param_shapes(cfg).items()})
    fp32_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / {"hf": "hf", "llmc": "model.bin", "reference": "model.pt"}[args.to]
        convert.save(cfg, params, dst, args.to)
        del params
        out = subprocess.run([sys.executable, "-c", MEASURE, str(dst), args.dtype], check=True, text=True,
                             capture_output=True, cwd=Path(__file__).resolve().parents[1]).stdout
    r = json.loads(out.strip().splitlines()[-1])
    mib = 2 ** 20
    print(f"{args.preset} from {args.to} as {args.dtype}: load {r['seconds']:.1f} s; "
          f"params {r['params_bytes'] / mib:.0f} MiB; after load, anonymous memory +{r['anon'] / mib:.0f} MiB "
          f"({r['anon'] / r['params_bytes']:.2f} x the params); peak RSS including mapped file pages "
          f"+{r['peak_rss'] / mib:.0f} MiB ({r['peak_rss'] / fp32_bytes:.2f} x the float32 weights, "
          f"{fp32_bytes / mib:.0f} MiB)")


if __name__ == "__main__":
    main()
