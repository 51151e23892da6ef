"""The docs a user reads: one page per task, each short enough to read in a sitting, every page reachable
from the README, and no link (file or #anchor) that leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# The pages a user opens for one task, and the measurements, one page per area; gcp.md (a walk-through that
# is read as one sequence of commands) is not split.
TASK_PAGES = ["training.md", "ray-training.md", "sweeps.md", "prediction.md", "outputs.md", "report.md", "speed.md",
              "flags.md", "errors.md",
              "measurements.md", "measurements-cpu.md", "measurements-accuracy.md", "measurements-store.md",
              "measurements-serving.md", "measurements-training-path.md", "measurements-spot.md"]
PAGE_LIMIT = 10 * 1024
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())
    return {slug(h) for h in re.findall(r"(?m)^#+ (.+)$", text)}


def test_slug_matches_githubs():
    assert slug("Captions: `--inputs`") == "captions---inputs"
    assert slug("Replay a run: `config.json` and `--config`") == "replay-a-run-configjson-and---config"


def test_task_pages_are_short_and_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for name in TASK_PAGES:
        size = (DOCS / name).stat().st_size
        assert size <= PAGE_LIMIT, f"docs/{name} is {size} bytes: split it by task"
        assert f"(docs/{name})" in readme, f"README.md does not link docs/{name}"
    assert all(f"(docs/{p.name})" in readme for p in DOCS.glob("*.md")), "a docs page the README does not link"


def test_every_relative_link_resolves():
    broken = []
    for page in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []
