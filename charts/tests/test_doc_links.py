"""Every relative link of the Markdown documentation resolves: README.md and the other
top-level *.md files, and docs/**/*.md. A link to a file or directory must name one that
exists; a `#anchor` into a Markdown file (or into the same file) must match one of its
headings, slugged the way GitHub does, or an explicit <a name/id>. Absolute URLs are not
fetched. A failure names file:line and the broken target."""

import os
import re
import urllib.parse

import pytest

from conftest import REPO_DIR


def markdown_files():
    files = sorted(REPO_DIR.glob("*.md")) + sorted((REPO_DIR / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
# [text](target) and ![alt](target), with an optional "title"; text may hold `code` and
# nested brackets one level deep. The target may be wrapped in <...>.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+\"[^\"]*\"|\s+'[^']*')?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HTML_ANCHOR = re.compile(r"<a\s[^>]*\b(?:name|id)\s*=\s*\"([^\"]+)\"", re.I)


def lines_outside_code(text):
    """(line number, line) of the lines outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            marker = m.group(1)
            if fence is None:
                fence = marker
                continue
            if marker[0] == fence[0] and len(marker) >= len(fence) and not line.strip()[len(marker):].strip():
                fence = None
                continue
        if fence is None:
            yield number, line


def github_slug(heading):
    """The anchor GitHub gives a heading: the rendered text, lower-cased, every character
    that is not a letter, digit, space, hyphen or underscore dropped, spaces made hyphens."""
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", heading)          # images: alt text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)             # links: their text
    text = re.sub(r"<[^>]+>", "", text)                               # inline HTML
    text = CODE_SPAN.sub(lambda m: m.group(2), text)                   # `code`: its content
    text = re.sub(r"(\*{1,3})(\S(?:.*?\S)?)\1", r"\2", text)           # *emphasis*, **strong**
    text = re.sub(r"(?<!\w)(_{1,3})(\S(?:.*?\S)?)\1(?!\w)", r"\2", text)  # _emphasis_
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path, cache={}):
    """Every anchor a Markdown file offers: heading slugs (repeats get -1, -2, ... as on
    GitHub) and explicit <a name="..."> / <a id="...">."""
    if path not in cache:
        found, seen = set(), {}
        previous = None
        for _, line in lines_outside_code(path.read_text(encoding="utf-8")):
            heading = None
            m = ATX.match(line)
            if m:
                heading = m.group(2)
            elif previous and previous.strip() and SETEXT.match(line) and not ATX.match(previous):
                heading = previous.strip()
            if heading is not None:
                slug = github_slug(heading)
                n = seen.get(slug, 0)
                seen[slug] = n + 1
                found.add(slug if n == 0 else f"{slug}-{n}")
            found.update(HTML_ANCHOR.findall(line))
            previous = line
        cache[path] = found
    return cache[path]


def links(path):
    """(line number, target) of every link of the file outside code."""
    for number, line in lines_outside_code(path.read_text(encoding="utf-8")):
        m = REFERENCE_DEF.match(line)
        if m:
            yield number, m.group(1).strip("<>")
            continue
        visible = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        for m in INLINE_LINK.finditer(visible):
            yield number, m.group(1).strip("<>")


def broken_links(path, root=REPO_DIR):
    """'file:line: target: why' for every relative link of `path` (under `root`, the
    repository) that does not resolve."""
    problems = []
    for number, target in links(path):
        if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # absolute URL (https:, mailto:, ...): not checked here
        where = f"{path.relative_to(root)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        file_part = urllib.parse.unquote(file_part)
        if file_part.startswith("/"):
            dest = (root / file_part.lstrip("/")).resolve()
        else:
            dest = (path.parent / file_part).resolve() if file_part else path
        if file_part and not dest.exists():
            problems.append(f"{where}: no such file or directory")
            continue
        if anchor and dest.is_file() and dest.suffix.lower() == ".md":
            anchor = urllib.parse.unquote(anchor)
            if anchor not in anchors(dest):
                problems.append(f"{where}: no heading with the anchor #{anchor} in "
                                f"{os.path.relpath(dest, root)}")
    return problems


FILES = markdown_files()


def test_the_documentation_is_found():
    names = {str(f.relative_to(REPO_DIR)) for f in FILES}
    assert {"README.md", "BENCH.md", "docs/relay.md", "docs/alerts.md"} <= names, names


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO_DIR)))
def test_relative_links_resolve(path):
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("heading, slug", [
    ("Quickstart on kind", "quickstart-on-kind"),
    ("`outbox-worker inbox`", "outbox-worker-inbox"),
    ("The application library (`outbox_worker::app`)", "the-application-library-outbox_workerapp"),
    ("What Pub/Sub's errors mean", "what-pubsubs-errors-mean"),
    ("Issue 12 (tracing): the relay with tracing off, at 1 % and at 100 %",
     "issue-12-tracing-the-relay-with-tracing-off-at-1--and-at-100-"),
    ("End-to-end test: `make e2e` (CI does not run it)", "end-to-end-test-make-e2e-ci-does-not-run-it"),
    ("Helm chart `charts/outbox-operator`", "helm-chart-chartsoutbox-operator"),
    ("**Bold** and [a link](x.md) and _em_", "bold-and-a-link-and-em"),
    ("Throughput, and why the streaming pull needed several streams",
     "throughput-and-why-the-streaming-pull-needed-several-streams"),
])
def test_github_slugs(heading, slug):
    assert github_slug(heading) == slug


def test_the_checker_finds_broken_links(tmp_path):
    """The checker can fail: a missing file, a missing anchor in another file and in the same
    file are each reported with file:line; links in code, absolute URLs and good anchors
    are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Repeated\n\n## Repeated\n\nSetext\n---\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n"
        "[ok](docs/a.md#a-page) [ok](docs/a.md#repeated-1) [ok](#title) [ok](docs/a.md#setext)\n"
        "[ok](docs/) [web](https://example.com/missing.md) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[missing file](docs/nope.md)\n"
        "[missing anchor](docs/a.md#nope)\n"
        "[missing local anchor](#nope)\n"
        "[ref]: docs/also-missing.md\n"
    )
    problems = broken_links(readme, root=tmp_path)
    assert problems == [
        "README.md:7: docs/nope.md: no such file or directory",
        "README.md:8: docs/a.md#nope: no heading with the anchor #nope in docs/a.md",
        "README.md:9: #nope: no heading with the anchor #nope in README.md",
        "README.md:10: docs/also-missing.md: no such file or directory",
    ], problems
