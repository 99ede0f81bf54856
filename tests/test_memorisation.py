"""The memorisation check against brute-force nearest neighbours in numpy."""
import numpy as np
import torch

import image_data
import memorisation


def brute_force_nearest(queries, references):
    """(distance, index) of each query's nearest reference, by the definition (no |a|^2 + |b|^2 - 2ab), float64."""
    q, r = np.asarray(queries, np.float64), np.asarray(references, np.float64)
    distances = [np.sqrt(((r - a) ** 2).sum(axis=1)) for a in q]
    return np.array([d.min() for d in distances]), np.array([d.argmin() for d in distances])


class MeanColour:
    """A stand-in for the offline evaluator: each image's mean colour is its feature."""
    kind = "evaluator"

    def __call__(self, images, cache=True):
        return images.double().mean(dim=(2, 3)).numpy()


def test_flags_a_copy_of_a_training_image_and_not_a_fresh_validation_image():
    data = image_data.make_shapes(n=300, image_size=8)
    train, validation = data.images[:200], data.images[200:]
    val_distances, _ = brute_force_nearest(validation.flatten(1) / 255, train.flatten(1) / 255)
    typical = int(np.argsort(val_distances)[len(val_distances) // 2])   # a validation image of median distance
    samples = torch.stack([train[37], validation[typical]])             # a copy, and an image the model never saw
    pixels, features = memorisation.check(samples, train, validation, MeanColour())

    threshold = np.quantile(val_distances, memorisation.QUANTILE)
    assert np.isclose(pixels.threshold, threshold)
    distances, index = brute_force_nearest(samples.flatten(1) / 255, train.flatten(1) / 255)
    assert np.allclose(pixels.sample_distances.numpy(), distances, atol=1e-6) and distances[0] == 0
    assert pixels.nearest_train.tolist() == index.tolist() and index[0] == 37
    assert pixels.share == 0.5   # the copy is flagged, the validation image is not

    mean_colour = MeanColour()
    distances, _ = brute_force_nearest(mean_colour(samples), mean_colour(train))
    val_distances, _ = brute_force_nearest(mean_colour(validation), mean_colour(train))
    assert features.space == "evaluator features"
    assert np.allclose(features.sample_distances.numpy(), distances, atol=1e-6)
    assert features.share == np.mean(distances < np.quantile(val_distances, memorisation.QUANTILE))
    assert "1 (50.0%) in pixels" in memorisation.summary([pixels, features])


def test_validation_images_themselves_give_about_five_percent():
    data = image_data.make_shapes(n=500, image_size=8)
    train, validation = data.images[:400], data.images[400:]
    (pixels,) = memorisation.check(validation, train, validation)
    distances, _ = brute_force_nearest(validation.flatten(1) / 255, train.flatten(1) / 255)
    assert pixels.share == np.mean(distances < np.quantile(distances, 0.05))
    assert 0.03 <= pixels.share <= 0.05
