"""GRPO on the bundled model with the `japanese` reward: a fifth of its sampled answers' letters are not Japanese at
first, and a fixed-seed run raises the Japanese share of its answers to prompts it never trained on."""
import json

import pytest

from ezoforge.reinforce import run as reinforce_run
from ezoforge.stages import load_recipe

QUESTIONS = [("日本の首都はどこですか。", "日本の首都は東京です。"),
             ("富士山の高さを教えてください。", "富士山の高さは3776メートルです。"),
             ("水の沸点は何度ですか。", "1気圧で100度です。"),
             ("日本で一番長い川は何ですか。", "信濃川です。"),
             ("俳句は何音でできていますか。", "五・七・五の十七音です。"),
             ("春の季語を一つ挙げてください。", "桜が春の季語です。"),
             ("一年は何日ありますか。", "365日、うるう年は366日です。"),
             ("光の速さはどれくらいですか。", "秒速約30万キロメートルです。"),
             ("日本の国花は何ですか。", "桜と菊が国花とされています。"),
             ("地球から月までの距離は。", "約38万キロメートルです。"),
             ("お茶の主な産地を一つ教えてください。", "静岡県が有名です。"),
             ("日本の通貨は何ですか。", "円です。"),
             ("一週間は何日ですか。", "7日です。"),
             ("太陽系で一番大きい惑星は。", "木星です。"),
             ("日本で一番高い山は。", "富士山です。"),
             ("寿司の主な材料は何ですか。", "酢飯と魚などの具です。"),
             ("四季を挙げてください。", "春、夏、秋、冬です。"),
             ("日本の首相官邸はどこにありますか。", "東京都千代田区永田町です。"),
             ("人間の骨はいくつありますか。", "成人で約206個です。"),
             ("虹は何色と言われますか。", "日本では七色と言われます。"),
             ("北海道の県庁所在地は。", "札幌市です。"),
             ("漢字の「山」の読み方は。", "やま、さん、と読みます。"),
             ("水の化学式は。", "H2Oです。"),
             ("日本の人口はおよそ何人ですか。", "約1億2千万人です。")]
SFT = ["model.name=bundled:smollm2-135m-instruct", "train.max_steps=1", "train.batch_size=1", "train.max_length=128",
       "train.gradient_checkpointing=false", "train.qlora=false", "train.learning_rate=1e-5", "train.eval_fraction=0.05",
       "train.save_every=1"]
RL = ["model.name=bundled:smollm2-135m-instruct", "reinforce.rewards={japanese: 1.0}", "reinforce.held_out=6",
      "reinforce.max_steps=12", "reinforce.num_generations=4", "reinforce.batch_size=2",
      "reinforce.max_completion_length=32", "reinforce.temperature=1.0", "reinforce.learning_rate=1e-3",
      "reinforce.beta=0.0", "reinforce.save_every=6", "train.gradient_checkpointing=false"]


@pytest.mark.slow
def test_the_japanese_reward_rises_on_held_out_prompts(tmp_path):
    from ezoforge.train import run as train_run

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "doc_id": f"d{i}", "instruction": q, "response": a},
                                       ensure_ascii=False) + "\n" for i, (q, a) in enumerate(QUESTIONS)),
                    encoding="utf-8")
    train_run.run(load_recipe(None, SFT), [data], tmp_path / "sft")  # one tiny step: the bundled model as it is
    stats = reinforce_run.run(load_recipe(None, RL), tmp_path / "sft", tmp_path / "rl")
    before, after = stats["before"], stats["after"]
    # Sampled from the same seed before and after: the rise is the model's.
    assert before["held_out"]["japanese"] < 0.85 and after["held_out"]["japanese"] > 0.92
    assert after["held_out"]["japanese"] - before["held_out"]["japanese"] > 0.1
    assert after["trained"]["japanese"] > before["trained"]["japanese"]
    assert 0 < after["held_out"]["japanese"] <= 1  # a share: marks such as ・ earn nothing
