"""Pilot table for experiments/tuning/NOTES.md: one row per qs-tune-* pilot report.

usage: .venv/bin/python experiments/tuning/summarize.py
Reads reports/qs-tune-*/results.parquet, runs/qs-tune-*/<method>/run.json and the
pilot logs (experiments/tuning/logs/*.log: load average before the run).
"""
import glob
import json
import re
from pathlib import Path

import pandas as pd

rows = []
for pq in sorted(glob.glob("reports/qs-tune-*/results.parquet")):
    exp = Path(pq).parent.name
    tag = exp[len("qs-tune-"):]
    d = pd.read_parquet(pq)
    for method, g in d.groupby("method"):
        run = json.loads(Path(f"runs/{exp}/{method}/run.json").read_text())
        tr = run["method"]["train"]
        log = Path(f"runs/{exp}/{method}/train_log.jsonl").read_text().strip().splitlines()
        ips = json.loads(log[-1])["images_per_s"]
        load = "?"
        for lf in (f"experiments/tuning/logs/{tag}.train.log", f"experiments/tuning/logs/{tag}.log"):
            if Path(lf).exists():
                m = re.search(r"load average: ([0-9.]+)", Path(lf).read_text(errors="replace"))
                if m:
                    load = m.group(1)
                    break
        g = g.sort_values("steps")
        fid = " / ".join(f"{v:.1f}" for v in g.fid)
        acc = " / ".join(f"{v:.2f}" for v in g.class_acc)
        ks = "/".join(str(int(s)) for s in g.steps)
        wall = g.train_wall_s.iloc[0]
        steps = int(g.train_steps.iloc[0])
        rows.append(f"| {tag} | {method} | {tr.get('lr')} | {tr.get('batch_size')} | {steps} | {tr.get('ema_decay')} "
                    f"| {wall / steps:.2f} ({ips:.0f} img/s, load {load}) | {ks} | {fid} | {acc} |")
print("| pilot | method | lr | batch | steps | ema | s/step loaded (img/s, load before) | k | FID@k | class acc@k |")
print("|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
