import json
import subprocess
import sys

from synthetic import tiny_config, write_random

from nqfmt import path_bits
from nqfmt import keys as K


def nqinfo(*args):
    return subprocess.run([sys.executable, "-m", "nqfmt.cli", *map(str, args)], capture_output=True, text=True)


def test_reports_bits_both_ways_and_ranks(tmp_path):
    path = tmp_path / "m.nq"
    cfg = tiny_config()
    write_random(path, cfg, ranks=(32,))
    out = nqinfo(path, "--json", "--verify")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    shapes = [cfg.linear_shape(lin) for lin in K.LINEARS]
    bits = sum(path_bits(m, n, min(32, m, n)) for m, n in shapes)
    assert abs(info["bpw_decoder_linears"] - bits / sum(m * n for m, n in shapes)) < 1e-12
    assert info["bpw_whole_file"] == path.stat().st_size * 8 / cfg.parameter_count()
    assert info["ranks"][1][K.ATTN_K] == [24] and info["ranks"][0][K.FFN_UP] == [32]
    assert info["verified"] is True
    text = nqinfo(path)
    assert "decoder linears" in text.stdout and "blk 0-1:" in text.stdout


def test_corrupt_file_one_line_and_nonzero_exit(tmp_path):
    path = tmp_path / "m.nq"
    write_random(path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last data tensors
    path.write_bytes(bytes(data))
    assert nqinfo(path).returncode == 0  # structure is intact; only --verify reads every byte
    out = nqinfo(path, "--verify")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "checksum mismatch" in out.stderr and "Traceback" not in out.stderr
    missing = nqinfo(tmp_path / "nope.nq")
    assert missing.returncode == 1 and "cannot open" in missing.stderr
