"""Each Japanese filter on small strings it must keep and drop (with the reason), plus real clean text."""
import json
from collections import Counter, defaultdict

import pytest

from ezoforge.curate.ja_filters import FILTERS, build_chain, clean_lines, normalize
from ezoforge.curate.settings import FiltersConfig, NormalizeConfig

# An encyclopedic paragraph written for these tests (465 characters): every filter keeps it.
CLEAN = (
    "琵琶湖は滋賀県の中央部に位置する日本最大の湖である。面積はおよそ六百七十平方キロメートルで、県の面積の"
    "約六分の一を占めている。湖には四百本を超える川が流れ込むが、流れ出る川は瀬田川ただ一本であり、この川は"
    "京都府に入ると宇治川、大阪府では淀川と名前を変えて大阪湾に注ぐ。\n"
    "琵琶湖は世界でも有数の古い湖として知られ、その起源は四百万年以上前にさかのぼると考えられている。長い歴史"
    "の中で独自の進化をとげた生き物も多く、ビワコオオナマズやニゴロブナなど、この湖にしかいない固有種が数多く"
    "確認されている。\n"
    "湖の水は近畿地方のおよそ千四百万人の暮らしを支える水源となっている。高度経済成長期には生活排水などによって"
    "水質が悪化し、赤潮が発生したこともあったが、住民の運動をきっかけに合成洗剤の使用を控える取り組みが広がった。"
    "現在も水質を守るための調査や活動が続けられている。\n"
    "湖の周辺には古くから多くの人が住み、港町や城下町が栄えた。江戸時代には北陸や東北から運ばれた米や海産物が"
    "湖上の船で京都や大阪へ送られ、湖は重要な交通路の役割を果たした。"
)
PARAS = CLEAN.split("\n")

CASES = [  # (filter, text, expected reason or None for kept)
    ("mojibake", CLEAN, None),
    ("mojibake", CLEAN + "\nパリのカフェ「Café de Flore」やベジェ曲線のPierre Bézierにも触れておく。", None),
    ("mojibake", CLEAN.encode("utf-8").decode("latin-1"), "mojibake"),  # UTF-8 read as latin-1
    ("mojibake", CLEAN.encode("utf-8").decode("cp932", "replace"), "mojibake"),  # 縺ゅ繧… : UTF-8 read as cp932
    ("mojibake", CLEAN.encode("cp932").decode("cp1252", "replace"), "mojibake"),  # Shift_JIS read as cp1252
    ("japanese", CLEAN, None),
    ("japanese", "Lake Biwa is the largest freshwater lake in Japan, located in Shiga Prefecture. " * 6, "not_japanese"),
    ("japanese", "<div class=\"nav\"><a href=\"/\">ホーム</a></div>\n<script>var x = 1; function f(a) { return a * 2; }</script>\n" * 5,
     "not_japanese"),
    ("japanese", "\n".join(f"2024/05/{d:02d} 12.5 18.3 7.1 0.0 65 3.2 1012.4" for d in range(1, 29)), "not_japanese"),
    ("kana", CLEAN, None),
    ("kana", "琵琶湖位于日本滋贺县中部，是日本最大的淡水湖。湖面积约六百七十平方公里，约占全县面积的六分之一。" * 6,
     "hiragana_ratio"),
    ("kana", "ワイヤレスイヤホンとノイズキャンセリングのブルートゥーススピーカーをセットでおとどけします。" * 6,
     "katakana_ratio"),
    ("length", CLEAN, None),
    ("length", PARAS[0], "too_short"),
    ("length", PARAS[0] + " This paragraph continues in English for quite a while to pad the length. " * 6, "too_short"),
    ("sentences", CLEAN, None),
    ("sentences", normalize(CLEAN.replace("、", "，").replace("。", "．")), None),  # academic ，． style
    ("sentences", "はい。そうです。了解。行きます。ありがとう。" * 25, "sentence_length"),  # average far below 20
    ("sentences", "、".join(PARAS[0].replace("。", "") for _ in range(4)) + "。", "sentence_length"),  # average > 90
    ("sentences", CLEAN + CLEAN + "\n" + "、".join(PARAS[0].replace("。", "") for _ in range(4)) + "。",
     "long_sentence"),  # one run-on sentence of 480 characters among normal ones
    ("ellipsis", CLEAN, None),
    ("ellipsis", "\n".join(p[:60] + "…" for p in PARAS * 2), "ellipsis"),  # truncated teasers
    ("ellipsis", "\n".join(p[:60] + "・・・" for p in PARAS * 2), "ellipsis"),
    ("duplicates", CLEAN, None),
    ("duplicates", "\n".join([PARAS[0], PARAS[1], PARAS[0], PARAS[0], PARAS[2]]), "dup_lines"),
    ("duplicates", "\n\n".join([CLEAN, CLEAN]), "dup_lines"),
    ("top_ngram", CLEAN, None),
    ("top_ngram", "格安ホテル予約、" * 40 + PARAS[0], "top_ngram"),  # keyword stuffing
    ("dup_ngram", CLEAN, None),
    ("dup_ngram", "".join(p + "詳しくは公式サイトをご覧ください。お問い合わせはこちらから。" for p in PARAS * 2), "dup_ngram"),
    ("lines", CLEAN, None),
    ("lines", "\n".join(["ホーム", "会社概要", "サービス一覧", "採用情報", "よくあるご質問", "お問い合わせ",
                         "プライバシーポリシー", "サイトマップ"] * 4), "line_punct"),
    ("lines", "\n".join(["雨。", "晴れ。", "くもり。", "雪。"] * 40), "newline_ratio"),
    ("stopwords", CLEAN, None),
    ("stopwords", "東京、大阪、名古屋、福岡、札幌、仙台、広島、京都、神戸、横浜。" * 10, "stopwords"),
    ("ng_words", CLEAN, None),
    ("ng_words", CLEAN + "\n今すぐ登録で高収入！誰でも稼げる副業、即金で稼げる！出会い系アダルト完全無料！", "ng_words"),
]


@pytest.mark.parametrize(("name", "text", "reason"), CASES,
                         ids=[f"{n}-{r or 'kept'}-{i}" for i, (n, _, r) in enumerate(CASES)])
def test_filter_keeps_or_drops_with_reason(name, text, reason):
    flt = FILTERS[name](getattr(FiltersConfig(), name))
    failed = flt.verdict(text)
    assert (failed[0] if failed else None) == reason, failed
    if failed:
        assert "=" in failed[1] and any(op in failed[1] for op in "<>")  # the detail says which value broke which limit


def test_thresholds_come_from_the_recipe():
    rule = FiltersConfig().length.model_copy(update={"min_chars": 100, "min_ja_chars": 100})
    assert FILTERS["length"](rule).verdict(PARAS[0]) is None


@pytest.mark.parametrize(("raw", "expected"), [
    ("ＡＢＣ１２３", "ABC123"),  # full-width ASCII to ASCII
    ("ｶﾀｶﾅﾃﾞｽ", "カタカナデス"),  # half-width kana to full-width, voiced marks composed
    ("待って…！本当に？", "待って…！本当に？"),  # Japanese ellipsis and full-width !? stay
    ("東京～大阪", "東京～大阪"),
    ("（株）と①", "(株)と1"),
    ("行1\r\n行2\r行3", "行1\n行2\n行3"),
    ("制御\x00文字\x07", "制御文字"),
    ("段落1   \n\n\n\n段落2", "段落1\n\n段落2"),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("詳しくは https://example.com/a?b=c をご覧ください。", "詳しくは  をご覧ください。"),
    ("本文です。\nCopyright (C) 2024 Example Inc. All rights reserved.\n続きです。", "本文です。\n続きです。"),
    ("短い英語 OK は残る。", "短い英語 OK は残る。"),
    ("コードの例：" + "x" * 120 + "でした。", "コードの例：でした。"),
    ("東京都千代田区\n本文があります。", "本文があります。"),  # a line without kana goes
])
def test_clean_lines(raw, expected):
    assert clean_lines(raw, NormalizeConfig()) == expected


def _chain_verdict(chain, text: str) -> str | None:
    from datatrove.data import Document

    doc = Document(text=text, id="t")
    for step in chain:
        if hasattr(step, "filter"):
            kept = step.filter(doc)
            if kept is not True:
                return kept[1]
        else:
            doc.text = step.format(doc.text)
    return None


def test_default_chain_keeps_the_shipped_wikipedia_articles_and_drops_its_stubs():
    from ezoforge.config import bundled_data
    from ezoforge.curate.readers import Shard, read_wiki

    path = bundled_data("bundled:wiki/jawiki-demo-pages-articles.xml")
    docs = list(read_wiki(Shard(path, 0, 0, 1), Counter()))
    chain = build_chain(FiltersConfig(), NormalizeConfig())
    verdicts = {d.metadata.get("title", d.id): _chain_verdict(chain, d.text) for d in docs}
    articles = {t for d, t in zip(docs, verdicts) if len(d.text) >= 400}
    stubs = {t for d, t in zip(docs, verdicts) if len(d.text) < 150}
    assert len(articles) == 35 and len(stubs) == 2, {t: len(d.text) for d, t in zip(docs, verdicts)}
    assert {t: verdicts[t] for t in articles if verdicts[t]} == {}
    assert {verdicts[t] for t in stubs} == {"too_short"}


def test_default_chain_keeps_clean_wikipedia(shared_data):
    """JSQuAD's Wikipedia paragraphs, joined per article: every article of at least 400 characters (the Swallow
    length rule; single paragraphs are mostly shorter) passes all default filters."""
    articles = defaultdict(list)
    for line in (shared_data / "jglue/jsquad/wikipedia_paragraphs.jsonl").open(encoding="utf-8"):
        row = json.loads(line)
        articles[row["title"]].append(row["text"])
    texts = [t for t in ("\n".join(p) for p in articles.values()) if len(t) >= 400]
    assert len(texts) > 80
    chain = build_chain(FiltersConfig(), NormalizeConfig())
    dropped = {t[:20]: r for t in texts if (r := _chain_verdict(chain, t))}
    assert dropped == {}


def test_repeat_coverage_matches_the_plain_definition():
    """The pruned, vectorised measure equals the plain one: characters under any later occurrence of an n-gram."""
    import re

    from ezoforge import text as tx

    def plain(t: str, n: int) -> int:
        seen, covered = set(), set()
        for i in range(len(t) - n + 1):
            if t[i:i + n] in seen:
                covered.update(range(i, i + n))
            seen.add(t[i:i + n])
        return len(covered)

    import pyarrow.parquet as pq

    from ezoforge.config import bundled_data

    web = pq.read_table(bundled_data("bundled:web/fineweb-demo.parquet")).column("text").to_pylist()
    texts = [re.sub(r"\s+", "", t) for t in web]  # good pages and junk (repeats, navigation, spam) alike
    texts += ["", "短い", "あいうえお" * 30, CLEAN + CLEAN[:200]]
    for t in texts:
        assert tx.repeat_coverage(tx.codepoints(t), [5, 10, 12, 20]) == {n: plain(t, n) for n in (5, 10, 12, 20)}


# ---------------------------------------------------------------- the web sample's gold labels

def test_web_labels_measure_the_filters_precision_and_recall(tmp_path):
    """`ezo curate` over the shipped FineWeb-style sample, scored against its gold labels (data/web/labels.jsonl):
    the quality filters should drop the junk pages and keep the good ones, deduplication the copies of good ones."""
    import pyarrow.parquet as pq

    from ezoforge.config import bundled_data
    from ezoforge.curate.run import run
    from ezoforge.stages import load_recipe

    labels = {r["id"]: r["label"] for r in map(json.loads, open(bundled_data("bundled:web/labels.jsonl"),
                                                                  encoding="utf-8"))}
    stats = run(load_recipe(None), [bundled_data("bundled:web/fineweb-demo.parquet")], tmp_path / "out")
    kept = {r["id"] for p in (tmp_path / "out" / "data").glob("*.parquet") for r in pq.read_table(p).to_pylist()}
    dropped = {r["id"]: r["reason"] for p in (tmp_path / "out" / "rejected").glob("*.parquet")
               for r in pq.read_table(p).to_pylist()}
    assert kept.isdisjoint(dropped) and kept | set(dropped) == set(labels) and stats["docs_in"] == len(labels) == 66

    def scores(predicted: set, actual: set) -> tuple[float, float]:
        hit = len(predicted & actual)
        return hit / len(predicted) if predicted else 1.0, hit / len(actual) if actual else 1.0

    dups = {"exact_dup", "near_dup"}
    junk = {i for i, label in labels.items() if label not in dups | {"good"}}
    by_filters = {i for i, reason in dropped.items() if reason != "duplicate"}
    filter_p, filter_r = scores(by_filters, junk)
    dedup_p, dedup_r = scores({i for i, reason in dropped.items() if reason == "duplicate"},
                              {i for i, label in labels.items() if label in dups})
    per_label = defaultdict(Counter)
    for i, label in labels.items():
        per_label[label][dropped.get(i, "kept")] += 1
    print(f"\nquality filters: precision {filter_p:.3f} recall {filter_r:.3f} ({len(junk)} junk pages); "
          f"dedup: precision {dedup_p:.3f} recall {dedup_r:.3f}")
    for label, outcome in sorted(per_label.items()):
        print(f"  {label:10} {dict(outcome)}")
    # Floors the shipped filters meet: no good page lost, every junk page and every copy caught.
    assert per_label["good"] == Counter(kept=36)
    assert (filter_p, filter_r) == (1.0, 1.0) and (dedup_p, dedup_r) == (1.0, 1.0)


def test_the_chain_runs_filters_in_the_order_the_recipe_section_declares():
    """The run order is FiltersConfig's field order, declared once; the filters that judge the text as found come
    before line cleaning, and a disabled filter is left out."""
    from ezoforge.curate.ja_filters import CleanLines, Normalize

    chain = build_chain(FiltersConfig.model_validate({"ellipsis": {"enabled": False}}), NormalizeConfig())
    names = [type(b).__name__ for b in chain]
    assert names == ["Normalize", "MojibakeFilter", "JapaneseFilter", "KanaFilter", "CleanLines", "LengthFilter",
                     "SentenceFilter", "DuplicatesFilter", "TopNgramFilter", "DupNgramFilter", "LinesFilter",
                     "StopwordFilter", "NgWordFilter"]
    assert isinstance(chain[0], Normalize) and isinstance(chain[4], CleanLines)
    assert list(FILTERS) == list(FiltersConfig.model_fields)  # every recipe rule has its block
