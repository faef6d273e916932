"""The README and docs/*.md against the repo: links, make targets, file paths and command-line flags.

Fast and offline: nothing trains. train.py's flags come from `train.build_parser()`; the other entry points build
their parser inside `main()`, so their flags come from one `SCRIPT --help` each (run together, cached).
"""

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = ("train.py", "predict.py", "bench.py", "sweep.py", "demo.py", "export.py")

# What a run or a user makes, named in the docs but never in the repo.
GENERATED = {"last.pt", "best.pt", "model.pt", "metrics.csv", "steps.csv", "final.json", "model.onnx",
             "accuracy_plots.png", "training_curves.png", "confusion_matrix.png", "misclassified.png"}
# run folders, MNIST, torchvision's cache, the venv; TensorBoard's tags (epoch/..., step/..., figures/...)
GENERATED_DIRS = {"runs", "data", "processed", ".venv", "epoch", "step", "figures"}
EXAMPLE_NAMES = {"._x.png"}  # the macOS resource-fork file predict.py skips, named as an example
PATH_EXTS = {"py", "md", "txt", "ipynb", "toml", "cfg", "ini", "sh", "png", "jpg", "csv", "pt", "json", "onnx",
             "yml", "yaml"}
PATH_RE = re.compile(r"^(?:\.{1,2}/)?[\w.*@+-]+(?:/[\w.*@+-]*)*$")
FLAG_RE = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SPAN_RE = re.compile(r"`([^`]+)`")
SEPARATORS = {";", "&&", "||", "|", "&"}


@functools.cache
def makefile():
    """({target: the entry point its recipe runs with $(ARGS), or None}) from the Makefile."""
    targets, current = {}, None
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", line)
        if m and not line.startswith("\t"):
            current = m.group(1)
            if not current.startswith("."):
                targets[current] = None
        elif line.startswith("\t") and current in targets:
            run = re.search(r"(\w+\.py) \$\(ARGS\)", line)
            if run and run.group(1) in SCRIPTS:
                targets[current] = run.group(1)
    return targets


@functools.cache
def script_flags():
    """{script: its --flags}: train.py's parser imported, the others' from `--help` in parallel processes."""
    import train

    flags = {"train.py": set(train.build_parser()._option_string_actions)}
    procs = {name: subprocess.Popen([sys.executable, str(REPO / name), "--help"], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in SCRIPTS if name not in flags}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, err[-2000:])
        flags[name] = set(FLAG_RE.findall(out))
    return flags


def slug(heading):
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    found, seen = set(), {}
    for line in strip_fences(path.read_text())[0].splitlines():
        if line.startswith("#"):
            s = slug(line.lstrip("#"))
            found.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return found


def strip_fences(text):
    """(the text with fenced blocks blanked, [(language, [lines])] of the blocks; continuation lines joined)."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if block is None:
                block = (line.strip().strip("`").strip().lower(), [])
            else:
                blocks.append((block[0], "\n".join(block[1]).replace("\\\n", " ").splitlines()))
                block = None
            prose.append("")
        elif block is not None:
            block[1].append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def split_words(command):
    """A shell line as words, comments dropped, `;`/`&&`/`|` as words of their own."""
    try:
        lex = shlex.shlex(command, posix=True, punctuation_chars=";&|")
        lex.whitespace_split, lex.commenters = True, "#"
        return list(lex)
    except ValueError:  # an unbalanced quote in prose: words are still words
        return command.split()


def check_command(words):
    """Problems of one command line's words."""
    problems = []
    commands, current = [], []
    for w in words:
        if w in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(w.strip("[]"))
    commands.append(current)
    for cmd in commands:
        while cmd and re.match(r"^[A-Z_]+=", cmd[0]):  # VAR=value before the command
            cmd = cmd[1:]
        if cmd[:1] == ["make"]:
            for w in cmd[1:]:
                if w.startswith("ARGS="):
                    runs = [makefile().get(t) for t in cmd[1:] if "=" not in t and not t.startswith("-")]
                    for target_script in {s for s in runs if s}:
                        problems += check_flags(target_script, shlex.split(w[len("ARGS="):]))
                elif "=" not in w and not w.startswith("-") and w not in makefile():
                    problems.append(f"make {w}: no such target in the Makefile")
            continue
        for i, w in enumerate(cmd):
            if Path(w).name in SCRIPTS and not w.startswith("-"):
                problems += check_flags(Path(w).name, cmd[i + 1:])
                break
    return problems


def check_flags(script, words):
    known = script_flags()[script]
    return [f"{script} {flag}: no such flag" for w in words for flag in FLAG_RE.findall(w.split("=")[0])
            if w.startswith("--") and flag not in known]


def check_inline_flags(span, scripts):
    """A `--flag` named on its own in prose must be a flag of an entry point its paragraph names (any, if none)."""
    flags = FLAG_RE.findall(span)
    if not flags or not span.lstrip("[").startswith("--"):
        return []
    known = set().union(*(script_flags()[s] for s in scripts or SCRIPTS))
    whose = f"not a flag of {' or '.join(sorted(scripts))}" if scripts else "no entry point has this flag"
    return [f"{flag}: {whose}" for flag in flags if flag not in known]


def check_path(token, page):
    token = token.strip("[](),;:'\"")
    if token.startswith("-") or "..." in token or not PATH_RE.match(token):
        return []
    name = token.rstrip("/").split("/")[-1]
    first = token.lstrip("./").split("/")[0]
    if "/" not in token and name.rsplit(".", 1)[-1] not in PATH_EXTS and name != "Makefile":
        return []
    if name in GENERATED or name in EXAMPLE_NAMES or first in GENERATED_DIRS or re.fullmatch(r"[A-Z]+", first):
        return []
    bases = [REPO, page.parent] + ([REPO / "tests", REPO / "s5"] if "/" not in token else [])
    if any(list(base.glob(token)) if "*" in token else (base / token).exists() for base in bases):
        return []
    return [f"`{token}`: no such file in the repo"]


def check_link(target, page):
    if re.match(r"^[a-z]+:", target):
        return []
    path, _, fragment = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return [f"link {target}: {path} does not exist"]
    if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
        return [f"link {target}: no heading #{fragment} in {dest.name}"]
    return []


def check_markdown(text, page):
    """Every problem of one markdown page, as lines to read."""
    prose, blocks = strip_fences(text)
    problems = []
    for target in LINK_RE.findall(prose):
        problems += check_link(target, page)
    for lang, lines in blocks:
        if lang in ("", "bash", "sh", "shell", "console"):
            for line in lines:
                problems += check_command(split_words(line.removeprefix("$ ")))
    # A paragraph, a list item or a table row: the entry points it names say whose flags it means.
    for context in re.split(r"\n\s*\n|\n(?=\s*- |\|)", prose):
        spans = [" ".join(span.split()) for span in SPAN_RE.findall(context)]
        named = {Path(w.strip("[]")).name for span in spans for w in span.split()} & set(SCRIPTS)
        for span in spans:
            words = split_words(span)
            if words[:1] == ["make"] or any(Path(w.strip("[]")).name in SCRIPTS for w in words):
                problems += check_command(words)
            else:
                problems += check_inline_flags(span, named)
            for token in span.split():
                problems += check_path(token, page)
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_page_matches_the_repo(page):
    assert check_markdown(page.read_text(), page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in LINK_RE.findall((REPO / "README.md").read_text())}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_the_checker_reports_what_is_wrong():
    made_up = """# A page

See [the missing page](nowhere.md), [a bad anchor](../README.md#no-such-heading) and [fine](speed.md#gpu).

```bash
python train.py --recipe fast --no-such-flag    # --commented-out is not a flag
torchrun --standalone --nproc_per_node=2 train.py --device cpu --bogus-after-torchrun
make nonesuch
make train ARGS="--recipe fast --bogus-in-args"
python predict.py runs/x/best.pt digits/ --json
```

`predict.py` takes `--epochs`; `s5/nonesuch.py` and `requirements-nonesuch.txt` are gone; `--bogus-inline` too.
`make bench` and `s5/run.py`, `test_loop.py`, `runs/x/last.pt` and `metrics.csv` are fine.

A paragraph naming no entry point: `--bogus-alone` is nobody's, `--port 80` is demo.py's.
"""
    problems = "\n".join(check_markdown(made_up, REPO / "docs" / "made-up.md"))
    for wrong in ("nowhere.md", "#no-such-heading", "train.py --no-such-flag", "train.py --bogus-after-torchrun",
                  "make nonesuch", "train.py --bogus-in-args", "--epochs: not a flag of predict.py", "`s5/nonesuch.py`",
                  "`requirements-nonesuch.txt`", "--bogus-inline: not a flag of predict.py",
                  "--bogus-alone: no entry point has this flag"):
        assert wrong in problems, (wrong, problems)
    for fine in ("speed.md#gpu", "--commented-out", "--standalone", "--nproc_per_node", "--json", "--recipe",
                 "--device", "make bench", "make train", "run.py", "test_loop", "last.pt", "metrics.csv", "--port"):
        assert fine not in problems, (fine, problems)
    assert len(problems.splitlines()) == 11, problems
