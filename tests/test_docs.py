"""The repository stands on its own: its documents link to nothing outside it."""
import re

from testbed.harness import ROOT


def test_no_document_links_outside_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "envoy").rglob("*.md"))]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#]+)", text):
            if re.match(r"[a-z]+://", target):
                continue  # a URL, not a file
            resolved = (doc.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
            assert resolved.exists(), f"{doc.name} links to a missing file: {target}"
        assert "../shared" not in text, doc.name
