"""tools/squad_from_explorer.py on a small made-up explorer repository: pages back to SQuAD's layout."""

import json
import subprocess

import pytest
import squad_from_explorer as X

from zotune.tasks import mezo_sample as M


def page(paragraphs: list[tuple[str, list[tuple[str, list[str]]]]]) -> str:
    """A made-up article page: the elements and classes the tool reads (a paragraph's
    `para-wrap` block with its `<pre>` context, each `qa-wrap` with its question and answers),
    texts escaped as pug escapes them, and filler markup of our own around them."""
    def esc(s):
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    body = "".join(
        f'<div class="para-wrap"><section><pre>{esc(c)}</pre></section><aside>' + "".join(
            f'<div class="qa-wrap"><p><strong class="question">{esc(q)}</strong></p><ul>'
            + "".join(f'<li><b>#{i + 1}</b> <span class="answer">{esc(a)}</span></li>' for i, a in enumerate(answers))
            + "</ul></div>" for q, answers in qas) + "</aside></div>" for c, qas in paragraphs)
    return f"<header>made-up page</header><main>{body}</main>"


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_pages_become_the_official_layout_in_file_order(tmp_path):
    repo = tmp_path / "explorer"
    titles = ["B_&_A", "Caf%C3%A9"]
    articles = {
        titles[0]: [("Tom & <Jerry> said \"hi\" &amp; left. ", [(" Who said hi? ", ["Tom", "Tom & <Jerry>"])]),
                    ("Second   paragraph\nline.", [("What?", ["line"]), ("Which?", ["Second"])])],
        titles[1]: [("Café.", [("Where?", ["Café"])])],
    }
    for split in ("train", "dev"):
        folder = repo / "explore" / "1.1" / split
        folder.mkdir(parents=True)
        links = "".join(f'<li><a href="/SQuAD-explorer/explore/1.1/{split}/{t.replace("&", "&amp;")}.html">'
                        f"1.1/{split}/{t}</a></li>" for t in titles)
        (folder / "index.html").write_text(f"<ul>{links}</ul>")
        for t in titles:
            (folder / f"{t}.html").write_text(page(articles[t]))
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pages")
    out = tmp_path / "originals"
    assert X.main(["--git-dir", str(repo / ".git"), "--commit", "HEAD", "--originals", str(out)]) == 0
    squad = json.loads((out / "SQuAD" / "train-v1.1.json").read_text())
    assert X.counts(squad) == (2, 3, 4, 5)
    records = M.read_squad((out / "SQuAD" / "dev-v1.1.json").read_text())
    assert records[0] == {"idx": 0, "title": "B_&_A", "context": "Tom & <Jerry> said \"hi\" &amp; left. ",
                          "question": " Who said hi? ", "answers": ["Tom", "Tom & <Jerry>"]}
    assert [(r["title"], r["question"]) for r in records[1:]] == [
        ("B_&_A", "What?"), ("B_&_A", "Which?"), ("Caf%C3%A9", "Where?")]
    assert records[1]["context"] == "Second   paragraph\nline."


def test_an_unknown_entity_is_refused():
    with pytest.raises(ValueError, match="unexpected entity"):
        X.unescape_pug("a &nbsp; b")
