"""Re-measure the SmolLM2 SFT demonstration's held-out replies at 64 tokens on a saved adapter (the script behind the
README figure): `python benchmarks/smollm2_demo_reeval.py [ADAPTER] [OUT.json]`, ADAPTER defaulting to the
demonstration's runs/smollm2-sft/adapter."""
import json
import sys
import time

import minilora
from minilora.adapter import load_adapter
from minilora.default import smollm2

ADAPTER = sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2-sft/adapter"
OUT = sys.argv[2] if len(sys.argv) > 2 else "smollm2_sft_reeval.json"
qs = smollm2.read_jsonl(smollm2.HERE / "smollm2_json_eval.jsonl")
p = smollm2.find_smollm2()
c = time.process_time()
m = minilora.load_model(p, dtype="float32"); t = minilora.load_tokenizer(p)
print("load cpu", time.process_time() - c, flush=True)
out = {}
for side in ("before", "after"):
    if side == "after":
        load_adapter(m, ADAPTER)
    c = time.process_time()
    r = smollm2.measure_sft(m, t, qs, 64)
    r["cpu_s"] = time.process_time() - c
    out[side] = r
    print(side, r["well_formed"], r["correct"], round(r["cpu_s"], 1), flush=True)
    for s in r["samples"]: print("  " + s.replace("\n", "\n  "))
json.dump(out, open(OUT, "w"), ensure_ascii=False, indent=1)
