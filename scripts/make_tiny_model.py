"""Make the embedded tiny chat model (data/models/tiny-chat) from scratch on the CPU.

    python scripts/make_tiny_model.py                 # the committed model, ~15 min
    python scripts/make_tiny_model.py --quick         # smoke run into a temporary folder

The work is in ``modkit.tiny.train``; this file only reads the command line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# NOTE: lets the script run from a plain checkout, without installing modkit first.
sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the whole pipeline."""
    # Imported here, after REPO_ROOT is on sys.path.
    from modkit.tiny.train import TrainConfig, make_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: data/models/tiny-chat in the repo, or a temporary folder with --quick)",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (2000, as the committed model)")
    parser.add_argument("--seed", type=int, default=0, help="seed for corpus, init, batches")
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 steps on a 2000-document corpus")
    args = parser.parse_args(argv)

    if args.quick:
        cfg = TrainConfig(steps=args.steps or 30, seed=args.seed, num_docs=2000, log_every=10, val_every=10)
        out = args.out or Path(tempfile.mkdtemp(prefix="tiny-chat-"))
    else:
        cfg = TrainConfig(steps=args.steps or 2000, seed=args.seed)
        out = args.out or REPO_ROOT / "data" / "models" / "tiny-chat"
    command = " ".join(["python", "scripts/make_tiny_model.py", *(argv if argv is not None else sys.argv[1:])])
    log = make_tiny_model(cfg, out, command)
    print(
        f"saved to {out}: train loss {log['final_train_loss']:.3f}, "
        f"val loss {log['final_val_loss']:.3f}, {log['train_seconds'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
