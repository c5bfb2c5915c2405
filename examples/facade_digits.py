"""The seed's workflow with the `Lepton` facade, on scikit-learn's digits (offline, CPU).

    python examples/facade_digits.py
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from lepton_automl import Lepton


def main() -> None:
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.uint8)  # 8x8 grayscale, 0..255
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )

    model = Lepton(build_fn="efficientnet_lite0", input_shape=(32, 32, 3), num_classes=10)
    model.fit(x_train, y_train, epochs=3, batch_size=64)
    loss, acc = model.evaluate(x_test, y_test)
    print(f"test loss {loss:.4f}, test accuracy {acc:.4f}")

    report = model.compress(prune=0.3, quant="int8")
    print(report)
    loss, acc = model.evaluate(x_test, y_test)
    print(f"after compression: test loss {loss:.4f}, test accuracy {acc:.4f}")

    path = model.save("lepton_model")
    again = Lepton.load(path)
    same = (again.predict(x_test) == model.predict(x_test)).mean()
    print(f"saved to {path}; reloaded model agrees on {same:.1%} of the test set")


if __name__ == "__main__":
    main()
