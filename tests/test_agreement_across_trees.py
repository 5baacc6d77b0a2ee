"""benchmarks/agreement_across_trees.py on the tiny checkpoint, on the CPU in float32 (where the batched engine
and the plain path give the same tokens): `run` measures this tree's engine against its plain path, page by page
with their tokens kept, and `compare` sets two runs' streams against each other, naming a page that parts."""

import json

from benchmarks import agreement_across_trees as trees
from tests.conftest import REPO


def test_a_run_keeps_both_paths_tokens_and_compare_names_where_pages_part(tiny_checkpoint, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("DEEPSEEK_OCR_DEVICE", "cpu")
    monkeypatch.setenv("DEEPSEEK_OCR_DTYPE", "float32")
    report = trees.run(REPO, tmp_path / "here.json", groups=1, checkpoint=tiny_checkpoint)
    (group,) = report["groups"]
    assert [page["seed"] for page in group["pages"]] == [0, 1, 2, 3]
    for page in group["pages"]:
        assert len(page["plain"]) == len(page["engine"]) == trees.TOKENS  # EOS ignored: every token decoded
        assert page["engine"] == page["plain"] and page["same"] == trees.TOKENS  # float32: the same tokens
    assert group["same"] == group["compared"] == 4 * trees.TOKENS
    assert json.loads((tmp_path / "here.json").read_text()) == report

    # another run whose engine parts from its plain path on the third page at token 10
    altered = json.loads(json.dumps(report))
    page = altered["groups"][0]["pages"][2]
    page["engine"][10] = page["engine"][10] + 1
    (tmp_path / "there.json").write_text(json.dumps(altered))
    capsys.readouterr()
    trees.compare([str(tmp_path / "here.json"), str(tmp_path / "there.json")])
    table = capsys.readouterr().out
    assert "| here: plain | here: engine | 256/256 | none |" in table
    assert "| here: engine | there: engine | 202/256 | 2: 10 |" in table
    assert "| there: plain | there: engine | 202/256 | 2: 10 |" in table


def test_common_prefix_counts_the_tokens_shared_from_the_first():
    assert trees.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert trees.common_prefix([1, 2], [1, 2, 3]) == 2
    assert trees.common_prefix([], [5]) == 0
