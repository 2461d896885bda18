"""learn2learn's ProtoNet training episode, timed the way benchmarks/protonet_step.py times ours.

The episode follows learn2learn's examples/vision/protonet_omniglot.py: support then query through
the encoder, prototypes = support.reshape(ways, shots, -1).mean(1), squared-L2 distances by
expand-subtract-pow-sum, NLLLoss on log_softmax(-d); Adam 1e-3, forward + backward + step. It runs
in fp32 (the example casts to float64). Encoders: ``cnn4`` = l2l.vision.models.CNN4Backbone(64, 1
channel, max-pool) as in their protonet_miniimagenet.py (a 64-d embedding, our Conv4's shape);
``omniglotcnn`` = the omniglot example's l2l.vision.models.OmniglotCNN(). ``--head l2l`` uses
l2l.nn.PrototypicalClassifier for the prototypes and distances instead. Random 28x28 images, seed 0.

Run it in its own venv (learn2learn 0.2.0's shipped .c files predate Python 3.11, so regenerate
them; the PyPI torchvision 0.28 wheel is a CUDA build that fails to import beside torch+cpu, so
0.16.2, whose import skips its missing C ops, is installed without its torch==2.1.2 pin):

    pip download --no-deps --no-binary :all: -d . learn2learn==0.2.0    # the sdist
    python3 -m venv /tmp/l2lenv && P="/tmp/l2lenv/bin/pip install" && $P torch==2.13.0 cython gym
    $P scipy requests tqdm pillow && $P --no-deps torchvision==0.16.2 && tar xzf learn2learn-0*.gz
    cd learn2learn-0.2.0 && /tmp/l2lenv/bin/cython -3 learn2learn/data/*.pyx && $P --no-deps .

    /tmp/l2lenv/bin/python benchmarks/learn2learn_protonet.py --threads 2 --steps 10 [--shots 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
import warnings

import torch

with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
    warnings.simplefilter("ignore")  # gym's NumPy-2 notice, torchvision's missing image.so
    import learn2learn as l2l


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ways", type=int, default=60)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--model", choices=["cnn4", "omniglotcnn"], default="cnn4")
    parser.add_argument("--head", choices=["example", "l2l"], default="example")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ways, shots, queries = args.ways, args.shots, args.queries

    if args.model == "cnn4":
        model = l2l.vision.models.CNN4Backbone(hidden_size=64, channels=1, max_pool=True)
    else:
        model = l2l.vision.models.OmniglotCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.NLLLoss()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(ways * (shots + queries), 1, 28, 28, generator=g)
    support_y = torch.arange(ways).repeat_interleave(shots)
    y = torch.arange(ways).repeat_interleave(queries)
    n_support = ways * shots

    def step() -> None:
        model.train()
        optimizer.zero_grad()
        z = model(x)
        support, query = z[:n_support], z[n_support:]
        if args.head == "l2l":
            classifier = l2l.nn.PrototypicalClassifier(support, support_y)
            logits = classifier(query)
        else:
            protos = support.reshape(ways, shots, -1).mean(dim=1)
            n, m = query.shape[0], protos.shape[0]
            logits = -(
                (query.unsqueeze(1).expand(n, m, -1) - protos.unsqueeze(0).expand(n, m, -1))
                .pow(2)
                .sum(dim=2)
            )
        loss = loss_fn(logits.log_softmax(dim=1), y)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "median_ms": round(1000 * statistics.median(times), 1),
                "torch": torch.__version__,
                "learn2learn": l2l.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
