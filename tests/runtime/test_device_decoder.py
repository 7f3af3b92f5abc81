"""The generator hands decoding to a backend's device decoder where the backend has one (the cuda backend's CUDA
graph) and the sampling settings allow it, and the tokens are those of the host path."""
import numpy as np
import pytest

import runtime
from synthetic_variants import write_text_model


class ForwardDecoder:
    """A device decoder built from the model's own forward pass, counting its steps."""

    max_top_k = 8

    def __init__(self, model, cache):
        self.model, self.cache, self.steps, self.context = model, cache, 0, []

    def _logits(self, token: int, pos: int) -> np.ndarray:
        self.steps += 1
        return self.model.forward(np.asarray([token]), pos, self.cache)[-1]

    def greedy(self, token: int, pos: int) -> int:
        return int(np.argmax(self._logits(token, pos)))

    def start_sampling(self, context: list[int], repetition_penalty: float) -> None:
        self.context = list(context)

    def sample(self, token: int, pos: int, sampler) -> int:
        self.context.append(token)
        return sampler(self._logits(token, pos), self.context)


@pytest.fixture(scope="module")
def nq(tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("decoder") / "m.nq")


@pytest.mark.parametrize("sampling,on_device", [
    (dict(temperature=0), True),
    (dict(temperature=0, repetition_penalty=1.3), True),
    (dict(temperature=0.9, top_k=5, seed=3), True),
    (dict(temperature=0.9, top_k=40, seed=3), False),  # more candidates than the decoder holds: the host samples
])
def test_device_decoder_gives_the_host_paths_tokens(nq, monkeypatch, sampling, on_device):
    host = runtime.load(nq, backend="numpy").generate("hello there", max_tokens=12, **sampling)
    m = runtime.load(nq, backend="numpy")
    made = []
    monkeypatch.setattr(m.backend, "decoder", lambda model, cache: made.append(ForwardDecoder(model, cache))
                        or made[-1], raising=False)
    assert m.generate("hello there", max_tokens=12, **sampling) == host
    assert (made[0].steps > 0) == on_device
