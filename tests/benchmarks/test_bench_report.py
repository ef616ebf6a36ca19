from benchmarks.report import SECTIONS, replace_section


def test_replacing_a_section_leaves_the_others_untouched(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    replace_section("embedding", "## Embedding\n\nold", path=path)
    replace_section("gallery", "## Gallery\n\nkept", path=path)

    replace_section("embedding", "## Embedding\n\nnew", path=path)

    text = path.read_text()
    assert "new" in text and "old" not in text
    assert "## Gallery\n\nkept" in text
    assert all(f"<!-- section: {name} -->" in text for name in SECTIONS)
    assert text.index("## Embedding") < text.index("<!-- section: liveness -->")


def test_an_unknown_section_is_appended(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- section: detection -->\n\nalpha\n")

    replace_section("extra", "## Extra\n\nbeta", path=path)

    text = path.read_text()
    assert text.index("alpha") < text.index("section: extra") < text.index("beta")
