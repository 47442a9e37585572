"""train.py's evaluation: passes of one shape that give the loss of the batches one by one."""

import json

from conftest import run_script
from test_checkpoint import ARGS, data_dir  # noqa: F401 (a fixture)


def test_eval_passes_one_shape_same_loss(data_dir):  # noqa: F811
    """batch_size 4 and eval_iters 6: eval_batch_size 16 would allow 4 batches per pass, but 6 = 4 + 2 would end
    with a smaller pass (torch.compile would compile again), so passes take 3; the loss is the same either way."""
    val_loss = {}
    for eval_batch_size, passes in ((0, "6 passes of 4 sequences"), (16, "2 passes of 12 sequences"),
                                    (24, "1 pass of 24 sequences"), (32, "1 pass of 24 sequences")):
        out = run_script("train.py", *ARGS, "--eval_iters=6", f"--eval_batch_size={eval_batch_size}",
                         "--eval_only=True", f"--out_dir=out{eval_batch_size}", cwd=data_dir).stdout
        assert f"evaluation: 6 batches per split, in {passes}" in out
        # a note says why 16 gives passes of 12 sequences, not 16 (32, one pass of all 24, needs none)
        assert ("allows 4 batches a pass, but only 3 divides eval_iters=6" in out) == (eval_batch_size == 16)
        with open(data_dir / f"out{eval_batch_size}/log.jsonl") as f:
            val_loss[eval_batch_size] = json.loads(f.readline())["val_loss"]
    assert abs(val_loss[16] - val_loss[0]) < 1e-5 and abs(val_loss[24] - val_loss[0]) < 1e-5
    assert 3.0 < val_loss[0] < 5.0  # an untrained model on 65 characters: about ln 65 = 4.17
