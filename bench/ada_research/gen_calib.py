import skvrt, json, time
prompts = ["Write a detailed essay about the history of the Roman Empire.",
 "Explain how a computer CPU works, step by step.",
 "Write a Python program that parses a CSV file and computes statistics, with comments.",
 "Tell me a long story about a sailor lost at sea.",
 "Describe the geography, climate and economy of Brazil.",
 "List twenty interesting facts about the human body, with numbers.",
 "Write a news article about a new scientific discovery in astronomy.",
 "Explain the rules of chess and some famous openings."]
llm = skvrt.load(threads=1)
out=[]
t=time.time()
for i,p in enumerate(prompts):
    txt = llm.chat([{"role":"user","content":p}], max_tokens=400, temp=0.8, top_p=0.95, seed=i)
    out.append(txt)
    print(i, len(txt), time.time()-t, flush=True)
open("/work/research/calib_gen.txt","w").write("\n\n".join(out))
