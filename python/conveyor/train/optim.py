"""The optimisers of ``conveyor train`` and ``conveyor demo``: Adam and SGD over a dict of named arrays
(NumPy or CuPy), updated in place, with a state that a checkpoint stores and restores exactly."""

from __future__ import annotations


class Adam:
    """Adam (Kingma & Ba 2015); moments are created at a parameter's first gradient."""

    name = "adam"

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.lr, self.beta1, self.beta2, self.eps, self.t = lr, beta1, beta2, eps, 0
        self.m, self.v = {}, {}

    def step(self, params: dict, grads: dict) -> None:
        self.t += 1
        correction1, correction2 = 1 - self.beta1**self.t, 1 - self.beta2**self.t
        for name, g in grads.items():
            if name not in self.m:
                self.m[name], self.v[name] = g * 0, g * 0
            self.m[name] = self.beta1 * self.m[name] + (1 - self.beta1) * g
            self.v[name] = self.beta2 * self.v[name] + (1 - self.beta2) * g * g
            update = (self.m[name] / correction1) / ((self.v[name] / correction2) ** 0.5 + self.eps)
            params[name] -= (self.lr * update).astype(params[name].dtype)

    def state(self) -> tuple[dict, dict]:
        """(JSON-able scalars, arrays by name) for a checkpoint."""
        arrays = {f"m.{k}": v for k, v in self.m.items()}
        arrays.update({f"v.{k}": v for k, v in self.v.items()})
        return {"lr": self.lr, "t": self.t}, arrays

    def load(self, scalars: dict, arrays: dict) -> None:
        self.lr, self.t = scalars["lr"], scalars["t"]
        self.m = {k[2:]: v for k, v in arrays.items() if k.startswith("m.")}
        self.v = {k[2:]: v for k, v in arrays.items() if k.startswith("v.")}


class SGD:
    """Plain stochastic gradient descent; ``lr`` may decay between epochs (Zaremba et al. 2014)."""

    name = "sgd"

    def __init__(self, lr: float):
        self.lr = lr

    def step(self, params: dict, grads: dict) -> None:
        for name, g in grads.items():
            params[name] -= (self.lr * g).astype(params[name].dtype)

    def state(self) -> tuple[dict, dict]:
        return {"lr": self.lr}, {}

    def load(self, scalars: dict, arrays: dict) -> None:
        self.lr = scalars["lr"]


OPTIMIZERS = {"adam": Adam, "sgd": SGD}
