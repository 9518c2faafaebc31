"""Every link and every repository path that README.md and docs/*.md name exists in the repository: a moved
section or a renamed file leaves no dead reference behind."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "data/README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))
TOP = ("unit/", "tests/", "experiments/", "docs/", "data/", "csrc/", ".ci/")
MADE = ("data/phantom", "data/hcp", "data/brats", "data/ixi")      # example outputs a command creates


def anchors(path):
    """GitHub's anchors of a markdown file's headings."""
    heads = re.findall(r"^#+ (.+)$", open(path).read(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES)
def test_links_and_paths_resolve(page):
    text = open(os.path.join(ROOT, page)).read()
    here = os.path.dirname(os.path.join(ROOT, page))
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):            # [text](target)
        if re.match(r"https?://", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, page)
        if not full.startswith(ROOT) or not os.path.exists(full):
            bad.append(target)
        elif anchor and anchor not in anchors(full):
            bad.append(target)
    for code in re.findall(r"`([^`\s]+)`", text):                  # `unit/model.py`, `experiments/...`
        path = code.split(":")[0].rstrip(".,;")
        if path.startswith(TOP) and "*" not in path and "NNN" not in path and not path.startswith(MADE):
            if not os.path.exists(os.path.join(ROOT, path)):
                bad.append(code)
    assert not bad, f"{page} names what is not in the repository: {bad}"


def test_readme_stays_short():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; results and studies go to docs/"
