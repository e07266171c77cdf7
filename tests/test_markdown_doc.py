"""The Markdown reader the README tests rely on (tests/markdown_doc.py), on a small text."""

from markdown_doc import anchors, blocks, headings, markers, outside_blocks

TEXT = """# Title

## Differential privacy (`[server.dp]`)

Run it:

<!-- readme: not runnable (needs a GPU) -->
```bash
fedsim run x.toml
```

### Claims
`scenarios/a.toml`:

```toml
seed = 1
```

```text
<!-- readme: not runnable (inside a block: an example, not a marker) -->
# not a heading
```

## Claims
"""


def test_blocks_carry_language_line_section_marker_and_lead():
    got = [(b.lang, b.line, b.section, b.not_runnable, b.lead) for b in blocks(TEXT)]
    assert got == [
        ("bash", 8, "Differential privacy ([server.dp])", "needs a GPU", "Run it:"),
        ("toml", 15, "Claims", None, "`scenarios/a.toml`:"),
        ("text", 19, "Claims", None, "`scenarios/a.toml`:"),
    ]
    assert blocks(TEXT)[0].text == "fedsim run x.toml\n"
    assert blocks(TEXT)[0].id == "differential-privacy-server-dp-L8"


def test_markers_and_headings_outside_blocks_only():
    assert markers(TEXT) == [(7, "not runnable (needs a GPU)")]
    assert headings(TEXT) == ["Title", "Differential privacy ([server.dp])", "Claims", "Claims"]
    assert "# not a heading" not in outside_blocks(TEXT)
    assert len(outside_blocks(TEXT).splitlines()) == len(TEXT.splitlines())


def test_anchors_follow_github():
    assert anchors(TEXT) == {"title", "differential-privacy-serverdp", "claims", "claims-1"}
