"""MediaWiki XML export -> plain-text documents: exact text for templates, refs, tables, files, categories,
cut sections; redirects and other namespaces skipped; .xml and .xml.bz2 read the same, streamed in shards."""
import bz2
from collections import Counter

import pytest

from ezoforge.curate.readers import Shard, read_wiki
from ezoforge.curate.wikitext import wikitext_to_text
from ezoforge.errors import RecordError

ARTICLE = """{{Infobox 湖沼
|名称 = 琵琶湖
|画像 = [[ファイル:Lake Biwa.jpg|250px]]
|面積 = 669.26
}}
{{出典の明記|date=2024年5月}}
'''琵琶湖'''（びわこ、{{lang-en|Lake Biwa}}）は、[[滋賀県]]にある[[湖|日本最大の湖]]である<ref name="kokudo">国土地理院による。</ref>。''古代湖''の一つとされ、{{仮リンク|固有種|en|Endemism}}が多い。
[[ファイル:Biwako.jpg|thumb|right|湖の空撮]]
[[画像:Old map.png|thumb|古い地図]]

== 地理 ==
湖には約450本の河川が流れ込むが、流れ出るのは[[瀬田川]]のみである<ref>{{Cite web|url=http://example.com|title=河川}}</ref>。
{| class="wikitable"
|-
! 項目 !! 値
|-
| 面積 || 669.26
|}
主な島：
* [[沖島]]
* [[竹生島]]（ちくぶしま）

=== 水質 ===
<!-- 要加筆 -->1970年代には[[赤潮]]が発生した&nbsp;。<br />詳細は[https://example.org/biwa 滋賀県の資料]を参照。

== 脚注 ==
{{Reflist}}

== 参考文献 ==
* 琵琶湖研究会『琵琶湖の本』2000年。

== 関連項目 ==
* [[淀川]]

== 外部リンク ==
* [https://example.org 公式サイト]

{{DEFAULTSORT:ひわこ}}
[[Category:日本の湖]]
[[カテゴリ:滋賀県の地理]]
[[en:Lake Biwa]]
[[zh-yue:琵琶湖]]
"""

ARTICLE_TEXT = (
    "琵琶湖（びわこ、Lake Biwa）は、滋賀県にある日本最大の湖である。古代湖の一つとされ、固有種が多い。\n"
    "地理\n"
    "湖には約450本の河川が流れ込むが、流れ出るのは瀬田川のみである。\n"
    "主な島：\n"
    "沖島\n"
    "竹生島（ちくぶしま）\n"
    "水質\n"
    "1970年代には赤潮が発生した\xa0。\n"
    "詳細は滋賀県の資料を参照。"
)


def _page(title: str, ns: int, pid: int, text: str, redirect: str | None = None) -> str:
    from xml.sax.saxutils import escape

    red = f'<redirect title="{escape(redirect)}" />' if redirect else ""
    return (f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>{pid}</id>{red}<revision><id>{pid}0</id>"
            f'<text bytes="{len(text.encode())}" xml:space="preserve">{escape(text)}</text></revision></page>\n')


def export(pages: list[str]) -> str:
    return ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="ja">\n'
            "<siteinfo><sitename>ウィキペディア</sitename><dbname>jawiki</dbname>"
            "<base>https://ja.wikipedia.org/wiki/%E3%83%A1%E3%82%A4%E3%83%B3%E3%83%9A%E3%83%BC%E3%82%B8</base>"
            '<namespaces><namespace key="0" case="first-letter" /><namespace key="6" case="first-letter">ファイル'
            '</namespace><namespace key="14" case="first-letter">Category</namespace></namespaces></siteinfo>\n'
            + "".join(pages) + "</mediawiki>\n")


PAGES = [
    _page("琵琶湖", 0, 101, ARTICLE),
    _page("びわこ", 0, 102, "#転送 [[琵琶湖]]"),  # redirect by text only
    _page("Biwa", 0, 103, "#REDIRECT [[琵琶湖]]", redirect="琵琶湖"),
    _page("Wikipedia:井戸端", 4, 104, "議論のページです。"),
    _page("Template:湖沼", 10, 105, "{{{名称}}}"),
    _page("瀬田 川", 0, 106, "'''瀬田川'''は[[琵琶湖]]から流れ出る唯一の河川である。\n\n== 関連項目 ==\n* [[宇治川]]"),
]


@pytest.fixture
def dump(tmp_path):
    path = tmp_path / "jawiki-test-pages-articles.xml"
    path.write_text(export(PAGES), encoding="utf-8")
    return path


def test_wikitext_to_plain_text_exactly():
    assert wikitext_to_text(ARTICLE) == ARTICLE_TEXT


@pytest.mark.parametrize(("wikitext", "plain"), [
    ("[[東京都|東京]]と[[大阪府]]", "東京と大阪府"),
    ("'''太字'''と''斜体''と'''''両方'''''", "太字と斜体と両方"),
    ("前{{要出典|date=2024年1月}}後", "前後"),
    ("{{要出典範囲|根拠の薄い記述|date=2024年1月}}。", "根拠の薄い記述。"),
    ("語<ref>注記</ref>。<ref name=\"a\" />", "語。"),
    ("[[:Category:湖]]を参照", "Category:湖を参照"),  # a colon link shows, it does not categorise
    ("<nowiki>[[リンクではない]]</nowiki>", "[[リンクではない]]"),
    ("<math>E=mc^2</math>の式", "の式"),
    ("__NOTOC__本文", "本文"),
    ("== 脚注・出典 ==\n本文ではない", ""),
    ("== 歴史 ==\n本文\n== 外部リンク ==\nリンク\n== 後記 ==\n残る", "歴史\n本文\n後記\n残る"),
])
def test_wikitext_snippets(wikitext, plain):
    assert wikitext_to_text(wikitext) == plain


def test_dump_yields_main_namespace_articles_only(dump):
    skipped = Counter()
    docs = list(read_wiki(Shard(str(dump), 0, 0, 1), skipped))
    assert [(d.id, d.metadata["title"], d.metadata["pos"]) for d in docs] == [("101", "琵琶湖", 1), ("106", "瀬田 川", 6)]
    assert docs[0].text == ARTICLE_TEXT
    assert docs[1].text == "瀬田川は琵琶湖から流れ出る唯一の河川である。"
    assert docs[0].metadata["source"] == "wikipedia"
    assert docs[1].metadata["url"] == "https://ja.wikipedia.org/wiki/%E7%80%AC%E7%94%B0_%E5%B7%9D"
    assert skipped == {"redirect": 2, "not_main_namespace": 2}


def test_bz2_dump_and_strided_shards_read_the_same(dump, tmp_path):
    packed = tmp_path / "jawiki-test-pages-articles.xml.bz2"
    packed.write_bytes(bz2.compress(dump.read_bytes()))
    whole = [(d.id, d.text) for d in read_wiki(Shard(str(dump), 0, 0, 1), Counter())]
    parts = [d for p in range(3) for d in read_wiki(Shard(str(packed), 0, p, 3), Counter())]
    assert sorted((d.id, d.text) for d in parts) == sorted(whole)
    assert {d.metadata["pos"] % 3 for d in parts if d.id == "101"} == {1}


def test_truncated_bz2_dump_is_a_clear_error(dump, tmp_path):
    packed = bz2.compress(dump.read_bytes())
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(RecordError, match=r"cut\.xml\.bz2: truncated or corrupt compressed file"):
        list(read_wiki(Shard(str(cut), 0, 0, 1), Counter()))


def test_malformed_xml_names_the_line(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text(export(PAGES[:1]).replace("<ns>0</ns>", "<ns>0</nss>"), encoding="utf-8")
    line = next(i for i, text in enumerate(bad.read_text(encoding="utf-8").split("\n"), 1) if "</nss>" in text)
    with pytest.raises(RecordError, match=rf"bad\.xml:{line}: malformed XML"):
        list(read_wiki(Shard(str(bad), 0, 0, 1), Counter()))
