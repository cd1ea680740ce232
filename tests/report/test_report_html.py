"""index.html: self-contained, escaped, every figure with its caption, notes and sub-headings."""

from html.parser import HTMLParser

from gradlake.report.html import Image, Section, render_index


class Tags(HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.tags, self.text = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_page_structure_and_escaping():
    sections = [
        Section("a", "Heatmaps <H>", "intro & more", images=[
            Image("figures/x.png", "x caption", group="checkpoint e1"),
            Image("figures/y.png", "y caption \"quoted\"", alt="y", group="checkpoint e1"),
            Image("figures/z.png", "z caption", group="checkpoint e2"),
        ]),
        Section("b", "Exact", notes=["not run <because>"]),
    ]
    page = render_index("report <t>", [("dataset", "euler & ns")], sections)
    parsed = Tags(page)
    names = [t for t, _ in parsed.tags]
    assert "script" not in names and "link" not in names
    assert [a["src"] for t, a in parsed.tags if t == "img"] == ["figures/x.png", "figures/y.png", "figures/z.png"]
    assert [a["href"] for t, a in parsed.tags if t == "a" and not a["href"].startswith("#")] == [
        "figures/x.png", "figures/y.png", "figures/z.png"]
    assert [a["id"] for t, a in parsed.tags if t == "section"] == ["provenance", "a", "b"]
    assert names.count("h3") == 2  # one per group change
    text = "".join(parsed.text)
    for fragment in ("report <t>", "euler & ns", "Heatmaps <H>", "not run <because>", 'y caption "quoted"'):
        assert fragment in text
    assert "<because>" not in page and "&lt;because&gt;" in page
    alts = [a["alt"] for t, a in parsed.tags if t == "img"]
    assert alts == ["x caption", "y", "z caption"]
