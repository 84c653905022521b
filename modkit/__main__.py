"""modkit's own commands: ``python -m modkit keys DIR``.

``keys DIR`` writes a fresh set of launch keys to ``DIR`` (mode 0700, each file 0600;
``modkit.transport.keyfiles``): the CURVE key pairs and the HMAC key that components
started by hand on one host or several share through ``--keys DIR``. Copy ``DIR`` to
every host of the pipeline (``scp -rp``, keeping the modes); it refuses to overwrite keys
already there. The components themselves start with ``python -m modkit.<component>``
(``modkit.pipeline.standalone``), the whole pipeline with ``scripts/start_all.py``.
"""

from __future__ import annotations

import argparse
import sys

from modkit.transport.keyfiles import KEY_FILES, KeyFileError, write_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modkit", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys", help="write fresh launch keys to DIR, for --keys DIR")
    keys.add_argument("dir", metavar="DIR", help="directory to create (mode 0700) or an empty one of yours")
    args = parser.parse_args(argv)
    try:
        write_keys(args.dir)
    except KeyFileError as error:
        print(f"modkit keys: {error}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(KEY_FILES)} to {args.dir}; copy it to every host and pass --keys {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
