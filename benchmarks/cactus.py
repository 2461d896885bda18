"""Unsupervised meta-learning (CACTUs, Hsu, Levine & Finn 2019): every evaluated run side by side
with the paper's cells, on the CACTUs protocol (1000 fixed test episodes, 5 queries per class;
Omniglot 5/20-way 1/5-shot on the 423 test characters, MNIST 10-way 1/5/10-shot).

    python benchmarks/cactus.py RUN_DIR... [--markdown]

Each RUN_DIR is a run that `metalab eval RUN_DIR` has scored (its eval.json): a ProtoNet or MAML
run trained on CACTUs tasks (`--cactus kmeans | hyperplanes`), on random labels (`--cactus
random`, randrand) or on the true classes of the same images (`--cactus off`, the oracle; with
`--episodes 0`, the untrained network: "from scratch"), or an
embedding run (acai, bigan, simclr), whose rows are its four embedding baselines. The paper's rows
follow (Omniglot; the shared PAPERS.md §17: [S] checked twice, [U] recalled, to verify).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metalab.reports import print_rows

TABLES = {"omniglot": ((5, 1), (5, 5), (20, 1), (20, 5)), "mnist": ((10, 1), (10, 5), (10, 10))}
PAPER = {  # Omniglot, accuracy % (5w1s, 5w5s, 20w1s, 20w5s)
    "CACTUs-MAML, ACAI [S]": (68.84, 87.78, 48.09, 73.36),
    "CACTUs-ProtoNets, ACAI [S]": (68.12, 83.58, 47.75, 66.27),
    "CACTUs-MAML, BiGAN [U]": (58.18, 78.66, 35.56, 58.62),
    "CACTUs-ProtoNets, BiGAN [U]": (54.74, 71.69, 33.40, 50.62),
    "best embedding baseline, ACAI (linear) [U]": (61.0, 82.0, 43.0, 66.0),
    "MAML from scratch (no meta-training) [U]": (52.5, 74.8, 24.9, 47.6),
    "supervised MAML oracle [U]": (94.5, 98.8, 84.6, 96.3),
}
NAMES = {"protonet": "ProtoNets", "maml": "MAML", "fomaml": "first-order MAML"}


def embedding_name(path: str) -> str:
    """What an embedding run is: its method, and AE for ACAI without the critic."""
    if path == "pixels":
        return "pixels (PCA-64)"
    config = json.loads((Path(path) / "config.json").read_text())
    if config["method"] == "acai":
        return "ACAI-lite" if config.get("adv_weight", 0.5) else "AE (ACAI-lite, no critic)"
    return {"bigan": "BiGAN", "simclr": "SimCLR (ours)"}.get(config["method"], config["method"])


def label(config: dict) -> str:
    """A meta-learner's row name from its config."""
    method = NAMES.get(config["method"], config["method"])
    if config["method"] == "maml" and config.get("first_order"):
        method = "MAML (first order)"
    how = config.get("cactus", "off")
    if config["episodes"] == 0:
        return f"{method} from scratch (no meta-training)"
    if how == "off":
        return f"oracle {method} (true labels)"
    if how == "random":
        return f"randrand {method}"
    embedding = embedding_name(config["cactus_embedding"])
    return f"CACTUs-{method}, {embedding}" + (" (hyperplanes)" if how == "hyperplanes" else "")


def cells(rows: list[dict], data: str, key=None) -> list[str]:
    """``mean ± CI`` per protocol of the table (the latest result with 5 queries)."""
    found = {}
    for r in rows:
        p = r["protocol"]
        if p.get("queries") == 5 and (key is None or key(p)):
            found[p["ways"], p["shots"]] = f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}"
    return [found.get(protocol, "-") for protocol in TABLES[data]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--markdown", action="store_true", help="markdown tables, for RESULTS.md")
    args = parser.parse_args()
    rows: dict[str, list[list[str]]] = {}  # per dataset: [row, training, run, cells...]
    for run in args.runs:
        config = json.loads((run / "config.json").read_text())
        data = config["data"]
        results = json.loads((run / "eval.json").read_text())["results"]
        steps = f"{config['episodes']:,} {'steps' if config['method'] != 'protonet' else 'ep'}"
        if config["method"] in ("acai", "bigan", "simclr"):
            name = embedding_name(str(run))
            for baseline in ("nearest-neighbour", "logistic-regression", "mlp", "cluster-matching"):
                found = cells(results, data, lambda p, b=baseline: p.get("baseline") == b)
                rows.setdefault(data, []).append(
                    [f"{baseline}, {name}", f"embedding {steps}", run.name, *found]
                )
            continue
        how = config.get("cactus", "off")
        partitions = f", P={config['cactus_partitions']}" if how != "off" else ""
        rows.setdefault(data, []).append(
            [label(config), f"{steps}{partitions}", run.name, *cells(results, data)]
        )
    if "omniglot" in rows:
        for name, values in PAPER.items():
            rows["omniglot"].append([f"paper: {name}", "", "", *(f"{v:.2f}" for v in values)])
    for data, found in rows.items():
        title = f"CACTUs on {data}: accuracy % (95% CI), 1000 episodes, 5 queries"
        header = ["row", "training", "run", *(f"{w}w{k}s" for w, k in TABLES[data])]
        print_rows(title, header, found, args.markdown, right=3)


if __name__ == "__main__":
    main()
