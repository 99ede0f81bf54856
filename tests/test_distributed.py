"""Training past one process (torchrun's DistributedDataParallel, on CPU with gloo, 2 processes), gradient
accumulation and mixed precision: each against a single-process run of the same batch."""
import contextlib
import io
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import train_script
from conftest import make_optimizers, write_image_folder


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, argv, out_dir):
    """One torchrun process: the environment torchrun sets, then train_script.train; its stdout and final weights
    are kept per rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        model, _ = train_script.train(argv)
    (out_dir / f"stdout_{rank}.txt").write_text(stdout.getvalue())
    torch.save(model.state_dict(), out_dir / f"weights_{rank}.pth")
    # Results are on disk: leave without the interpreter's teardown, whose C++ static destructors occasionally abort
    # a spawned worker ("terminate called without an active exception", SIGABRT) after its work is done, failing
    # the test on exit. The test checks what the workers wrote, not how their interpreter ends.
    os._exit(0)


def run_processes(world, argv, out_dir):
    mp.spawn(worker, args=(world, free_port(), argv, out_dir), nprocs=world, join=True)
    return [torch.load(out_dir / f"weights_{r}.pth", weights_only=True) for r in range(world)]


@pytest.fixture
def data(tmp_path):
    # 20 images: the 80/20 split leaves 16 to train on, one batch of 16 or two of 8
    return write_image_folder(tmp_path / "data", per_class=10, size=8, classes=("a", "b"))


def flags(tmp_path, data, *more):
    return ["--model", "MLPAE", "--data", str(data), "--image-size", "8", "--models-dir", str(tmp_path / "models"),
            "--log-dir", str(tmp_path / "log"), "--lr", "0.01", *map(str, more)]


def assert_same(a, b, atol):
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol), key


def test_two_processes_with_batch_b_step_as_one_process_with_batch_2b_and_only_rank_0_writes(tmp_path, data):
    # plain SGD, as in the accumulation test below: Adam's normalised step magnifies the rounding of gradients near
    # 0, whose all-reduced sum differs in the last bits from one process's (beyond 1e-6 with AVX-512 kernels)
    sgd = ["--optimizer", "sgd", "--epochs", 1]
    two = run_processes(2, flags(tmp_path / "two", data, *sgd, "--batch-size", 8), tmp_path)
    assert_same(two[0], two[1], 0)                                         # the processes agree exactly
    one, _ = train_script.train(flags(tmp_path / "one", data, *sgd, "--batch-size", 16))
    assert_same(two[0], one.state_dict(), 1e-6)
    outs = [(tmp_path / f"stdout_{r}.txt").read_text() for r in range(2)]
    assert outs[0].count("epoch 1 ") == 1 and "x 2 processes" in outs[0] and outs[1] == ""
    assert sorted(p.name for p in (tmp_path / "two" / "models").iterdir()) == ["Best_MLPAE.pth", "Last_MLPAE.pth", "MLPAE.toml"]
    assert len(list((tmp_path / "two" / "log" / "MLPAE").iterdir())) == 1   # one TensorBoard file: rank 0's


def test_resume_under_two_processes_continues_exactly(tmp_path, data):
    straight = run_processes(2, flags(tmp_path / "a", data, "--batch-size", 4, "--epochs", 2, "--flip"), tmp_path)
    run_processes(2, flags(tmp_path / "b", data, "--batch-size", 4, "--epochs", 1, "--flip"), tmp_path)
    resumed = run_processes(2, flags(tmp_path / "b", data, "--epochs", 2, "--resume"), tmp_path)
    assert_same(straight[0], resumed[0], 0)


def test_gradient_accumulation_equals_the_whole_batch(tmp_path, data):
    # plain SGD: the step is the gradient itself (Adam's normalised step would magnify float rounding where a
    # gradient is near 0, which summing in another order changes)
    sgd = ["--optimizer", "sgd", "--batch-size", 16, "--epochs", 2]
    one, _ = train_script.train(flags(tmp_path / "one", data, *sgd))
    accumulated, _ = train_script.train(flags(tmp_path / "acc", data, *sgd, "--grad-accum", 4))
    assert_same(one.state_dict(), accumulated.state_dict(), 1e-6)


def test_bf16_autocast_trains_with_finite_losses_and_fp32_weights():
    import ddpm
    torch.manual_seed(0)
    model = ddpm.Model(ddpm.Config(width=8, channel_mults=(1, 2), attention_levels=(1,), timesteps=50), (3, 8, 8))
    optimizers = make_optimizers(model, lr=1e-3)
    optimizers.dtype = torch.bfloat16   # what --precision bf16 sets
    x = torch.rand(8, 3, 8, 8)
    for _ in range(5):
        terms = model.train_step(x, None, optimizers)
        assert torch.isfinite(terms["loss"]) and terms["loss"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    seen = {}
    model.unet.head.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))   # returns None: output kept
    model.train_step(x, None, optimizers)
    assert seen["dtype"] == torch.bfloat16                                  # the forward pass did run in bf16
