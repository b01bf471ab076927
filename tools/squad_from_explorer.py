"""Rebuild SQuAD v1.1's train and dev questions from the SQuAD explorer's article pages.

    python tools/squad_from_explorer.py --git-dir MIRROR --originals DIR [--commit C]

The official train-v1.1.json (30 MB) and dev-v1.1.json (4.9 MB) are not in any repository
snapshot reachable here (files of 4 MiB and more are dropped), but the dataset authors'
site, rajpurkar/SQuAD-explorer, rendered every article of both files to its own page on
2016-08-24 (`gulpfile.js` + `views/article.pug`): commit 0b3c8e82 holds explore/1.1/train/
(442 pages) and explore/1.1/dev/ (48), each split's index.html listing the articles in file
order. A page is the article's paragraphs in order, each `<pre>context</pre>` followed by its
questions (`<strong class="question">`) and their answers (`<span class="answer">`), all
text through pug's escape (& < > " only), which `unescape_pug` inverts exactly. Titles come
from the index's links (the raw JSON title; the page's h1 is URI-decoded).

Written: DIR/SQuAD/train-v1.1.json and dev-v1.1.json in the official layout, with the
fields `read_squad` reads (title, context, question, answer texts); the ids and answer
offsets are not on the pages. data/SOURCES.md records the counts and checksums.
"""

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

EXPLORER_COMMIT = "0b3c8e824b9fd05ad69e9b6b590966e4aade2baf"
_ENTITY = re.compile(r"&(amp|lt|gt|quot);")


def unescape_pug(text: str) -> str:
    """Invert pug's escape; any other '&' means the page is not what this reader expects."""
    if "&" in _ENTITY.sub("", text):
        raise ValueError(f"unexpected entity in {text[:80]!r}")
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")


def article_titles(index_html: str, split: str) -> list[str]:
    links = re.findall(rf'href="/SQuAD-explorer/explore/1\.1/{split}/([^"]*)\.html"', index_html)
    return [unescape_pug(t) for t in links]


def one(pattern: str, text: str) -> str:
    found = re.findall(pattern, text, re.DOTALL)
    if len(found) != 1:
        raise ValueError(f"expected one match of {pattern!r}, found {len(found)}")
    return found[0]


def article_paragraphs(page: str) -> list[dict]:
    """Paragraphs of one article page, in order, as the official file's paragraphs (texts only)."""
    paragraphs = []
    for block in page.split('<div class="para-wrap">')[1:]:
        qas = []
        for qa in block.split('<div class="qa-wrap">')[1:]:
            answers = re.findall(r'<span class="answer">(.*?)</span>', qa, re.DOTALL)
            if not answers:
                raise ValueError("a question without answers")
            qas.append({"answers": [{"text": unescape_pug(a)} for a in answers],
                        "question": unescape_pug(one(r'<strong class="question">(.*?)</strong>', qa))})
        paragraphs.append({"context": unescape_pug(one(r"<pre>(.*?)</pre>", block)), "qas": qas})
    return paragraphs


def rebuild_split(show, split: str) -> dict:
    """The split's file as {"data": [...], "version": "1.1"}; `show(path)` reads a page's text."""
    base = f"explore/1.1/{split}"
    data = [{"title": title, "paragraphs": article_paragraphs(show(f"{base}/{title}.html"))}
            for title in article_titles(show(f"{base}/index.html"), split)]
    return {"data": data, "version": "1.1"}


def counts(squad: dict) -> tuple[int, int, int, int]:
    """articles, paragraphs, questions, answers"""
    paragraphs = [p for a in squad["data"] for p in a["paragraphs"]]
    questions = [q for p in paragraphs for q in p["qas"]]
    return len(squad["data"]), len(paragraphs), len(questions), sum(len(q["answers"]) for q in questions)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--git-dir", type=Path, required=True, help="a git copy of rajpurkar/SQuAD-explorer")
    parser.add_argument("--commit", default=EXPLORER_COMMIT, help="the commit whose explore/1.1/ pages to read")
    parser.add_argument("--originals", type=Path, required=True, help="folder to write SQuAD/*.json into")
    args = parser.parse_args(argv)

    def show(path: str) -> str:
        return subprocess.run(["git", "--git-dir", str(args.git_dir), "show", f"{args.commit}:{path}"],
                              capture_output=True, check=True).stdout.decode("utf-8")

    out = args.originals / "SQuAD"
    out.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train-v1.1.json"), ("dev", "dev-v1.1.json")):
        squad = rebuild_split(show, split)
        text = json.dumps(squad, ensure_ascii=False)
        (out / name).write_text(text, encoding="utf-8")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        print(f"{out / name}\tarticles, paragraphs, questions, answers {counts(squad)}\t{digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
