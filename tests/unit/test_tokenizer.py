"""Tokenizers: exact round-trips (Chinese included), compression, save/load, errors."""

from __future__ import annotations

import json

import pytest

from linscale.data.tokenizer import EOS, Tokenizer, byte_tokenizer, train_bpe

POEMS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
    "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。",
    "两个黄鹂鸣翠柳，一行白鹭上青天。窗含西岭千秋雪，门泊东吴万里船。",
    "君不见黄河之水天上来，奔流到海不复回。君不见高堂明镜悲白发，朝如青丝暮成雪。",
    "空山新雨后，天气晚来秋。明月松间照，清泉石上流。竹喧归浣女，莲动下渔舟。",
]
PROSE = (
    "这几天心里颇不宁静。今晚在院子里坐着乘凉，忽然想起日日走过的荷塘，在这满月的光里，"
    "总该另有一番样子吧。月亮渐渐地升高了，墙外马路上孩子们的欢笑，已经听不见了；妻在屋里拍着闰儿，"
    "迷迷糊糊地哼着眠歌。我悄悄地披了大衫，带上门出去。沿着荷塘，是一条曲折的小煤屑路。"
    "这是一条幽僻的路；白天也少人走，夜晚更加寂寞。荷塘四面，长着许多树，蓊蓊郁郁的。"
    "路的一旁，是些杨柳，和一些不知道名字的树。没有月光的晚上，这路上阴森森的，有些怕人。"
    "今晚却很好，虽然月光也还是淡淡的。现代城市里，人们每天乘坐地铁上班，用手机阅读新闻，"
    "在电脑前编写程序，训练语言模型，讨论数据、算法和计算资源的分配。"
)
ASCII = "The quick brown fox jumps over the lazy dog. def f(x):\n\treturn x * 2  # tabs, newlines\r\n"
MIXED = "Tokyo 東京 and 北京 🎉🚀 naïve café — «quotes» 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00 end"
SAMPLES = [ASCII, PROSE, *POEMS, MIXED, "", " leading space", "trailing space ", "  ", f"text with {EOS} inside"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe([PROSE, *POEMS, ASCII * 3], 400)


def test_byte_tokenizer_shape():
    tok = byte_tokenizer()
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("bytes", 257, 256)
    assert tok.encode("é") == [0xC3, 0xA9]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(bpe, text):
    for tok in (byte_tokenizer(), bpe):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eos_id not in ids  # EOS only comes from the data pipeline
        assert tok.decode(ids) == text


def test_encode_batch_matches_encode(bpe):
    for tok in (byte_tokenizer(), bpe):
        assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_bpe_vocab_and_eos(bpe):
    assert 300 < bpe.vocab_size <= 400
    assert bpe.name == f"bpe-{bpe.vocab_size}"
    assert bpe.decode([bpe.eos_id]) == EOS
    ids = bpe.encode("甲") + [bpe.eos_id] + bpe.encode("乙")
    assert bpe.decode(ids) == f"甲{EOS}乙"


def test_bpe_compresses(bpe):
    for text in (PROSE, "".join(POEMS)):
        assert len(bpe.encode(text)) < 0.8 * len(text.encode("utf-8"))


def test_save_load_same_ids(bpe, tmp_path):
    for tok in (byte_tokenizer(), bpe):
        path = tmp_path / f"{tok.name}.json"
        tok.save(path)
        json.loads(path.read_text())  # one JSON file
        back = Tokenizer.load(path)
        assert (back.name, back.vocab_size, back.eos_id) == (tok.name, tok.vocab_size, tok.eos_id)
        assert back.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
        assert back.encode(f"a{EOS}b") == tok.encode(f"a{EOS}b")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"bpe-{bpe.vocab_size}.json", "bytes.json"]


def test_vocab_too_small():
    with pytest.raises(ValueError, match="minimum is 258"):
        train_bpe(["abc"], 257)


@pytest.mark.parametrize("content", ['{"hello": 1}', "not json at all", "[1, 2]"])
def test_load_non_tokenizer(tmp_path, content):
    path = tmp_path / "weird.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="weird.json"):
        Tokenizer.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")
