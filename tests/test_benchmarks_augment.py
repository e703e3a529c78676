import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_augment_benchmark_quick_writes_json_and_section(tmp_path):
    from benchmarks import augment

    md = tmp_path / "augment.md"
    md.write_text("# Augment\n\n<!-- BEGIN augment_speed -->\nold\n<!-- END augment_speed -->\n\nafter\n")
    data_md = tmp_path / "data.md"
    augment.main(["--quick", "--out-json", str(tmp_path / "a.json"), "--out-md", str(md), "--out-data-md", str(data_md)])
    data = json.loads((tmp_path / "a.json").read_text())
    (row,) = data["rows"]
    assert row["size"] == 16 and row["star_img_s"] > 0 and row["kornia_img_s"] > 0
    text = md.read_text()
    (shapes,) = data["shapes"]
    assert shapes["num_samples"] == 64 and shapes["seconds"] > 0
    assert "64 images at 16×16" in data_md.read_text()
    assert "old" not in text and "STARAugment" in text and text.rstrip().endswith("after")
