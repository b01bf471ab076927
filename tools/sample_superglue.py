"""Write MeZO's large-model samples (1,000 train / 500 dev / 1,000 test) from the original files.

    python tools/sample_superglue.py --originals DIR [--seed 0] [--out data] [TASK ...]

DIR holds the originals in their published layout: SuperGLUE's `RTE/ CB/ COPA/ BoolQ/ WiC/ WSC/
MultiRC/` folders with `train.jsonl` and `val.jsonl`, `SQuAD/train-v1.1.json` and
`dev-v1.1.json` (tools/squad_from_explorer.py rebuilds them), and `SST-2/glue/` (this
repository's data/ folder has that one, so `--originals data sst2` works offline). Tasks whose
originals are missing are skipped with a line saying so. Each written file is `<out>/mezo-large/<Task>/<seed>/<split>.jsonl.xz`; the
printed sha256 is of the uncompressed text, the value data/SOURCES.md records. The sampling
itself is `zotune.tasks.mezo_sample` (its docstring says how the reference samples).
"""

import argparse
import hashlib
import sys
from pathlib import Path

from zotune.errors import UserError
from zotune.tasks.mezo_sample import ORIGINALS, SPLITS, sample_path, sample_task, write_xz


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--originals", type=Path, required=True, help="folder of the original files")
    parser.add_argument("--seed", type=int, default=0, help="MeZO's --train_set_seed (mezo.sh's SEED, default 0)")
    parser.add_argument("--out", type=Path, default=Path("data"), help="data folder to write mezo-large/ into")
    parser.add_argument("tasks", nargs="*", default=list(ORIGINALS), help=f"any of {', '.join(ORIGINALS)}")
    args = parser.parse_args(argv)
    for name in args.tasks:
        if name not in ORIGINALS:
            parser.error(f"unknown task {name!r}; choose from {', '.join(ORIGINALS)}")
        try:
            texts = sample_task(name, args.originals, args.seed)
        except UserError as e:
            print(f"{name}: skipped, {e}", file=sys.stderr)
            continue
        for split in SPLITS:
            path = sample_path(args.out, name, args.seed, split)
            write_xz(path, texts[split])
            digest = hashlib.sha256(texts[split].encode("utf-8")).hexdigest()
            print(f"{path}\t{texts[split].count(chr(10))}\t{digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
