"""A dev text of plain prose for tuning the KV policies (bench/rdr_dev.py): the model's own writing from prompts and
seeds that are not the calibration text's (skvrt.calibrate.PROMPTS, seeds 0..5), never the evaluation text.

    OPENBLAS_NUM_THREADS=1 python bench/dev_text.py OUT.txt      # ~4,360 tokens, ~5 minutes on one core
"""
import sys

import skvrt

out = sys.argv[1] if len(sys.argv) > 1 else "dev_gen.txt"
llm = skvrt.load(None, n_ctx=2048, threads=1, device="cpu")
prompts = ["Write a long article about the history of aviation, from balloons to jet engines.",
           "Describe the life and works of a famous 19th-century novelist in detail.",
           "Write an encyclopedia entry about the river Danube: geography, history, cities and economy.",
           "Tell the story of a small village during a harsh winter, with many characters.",
           "Explain the causes, events and consequences of the French Revolution.",
           "Write a detailed report on the ecology of coral reefs and the threats they face."]
parts = [llm.chat([{"role": "user", "content": p}], max_tokens=800, temp=0.8, top_p=0.95, seed=100 + i) for i, p in enumerate(prompts)]
open(out, "w").write("\n\n".join(parts))
print(len(llm.tokenizer.encode("\n\n".join(parts))), "tokens")
