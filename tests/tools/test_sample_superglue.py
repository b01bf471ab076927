"""tools/sample_superglue.py on small synthetic originals: it writes what the library samples."""

import hashlib
import json
import lzma
from pathlib import Path

import sample_superglue
from zotune.tasks import mezo_sample as M


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_tool_writes_what_the_library_samples(tmp_path, capsys):
    originals, out = tmp_path / "originals", tmp_path / "out"
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": "entailment", "idx": i} for i in range(40)]
    write_jsonl(originals / "CB" / "train.jsonl", rows)
    write_jsonl(originals / "CB" / "val.jsonl", rows[:9])
    argv = ["--originals", str(originals), "--out", str(out), "--seed", "3", "cb", "copa"]
    assert sample_superglue.main(argv) == 0
    printed = capsys.readouterr()
    assert "copa: skipped, no file" in printed.err
    texts = M.sample_task("cb", originals, 3)
    for split in M.SPLITS:
        path = M.sample_path(out, "cb", 3, split)
        assert lzma.decompress(path.read_bytes()).decode() == texts[split]
        assert hashlib.sha256(texts[split].encode()).hexdigest() in printed.out
    assert [len(texts[s].splitlines()) for s in M.SPLITS] == [0, 40, 9]  # all 40 drawn, and the last 100 are dev
