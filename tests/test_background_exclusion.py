"""A background never shows the category pasted into it: every annotation of the background
image counts, kept as a segment or not (crowd and small instances included), as in the
authors' generator."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
from synthetic import SAMPLE_ANNOTATIONS

from datagen.config import BuildConfig
from datagen.synth.sampling import Sampler


def all_annotated_categories() -> dict[int, set[int]]:
    """{image id: category ids of all its annotations}, read from the annotation file itself."""
    dataset = json.loads(SAMPLE_ANNOTATIONS.read_text())
    categories = defaultdict(set)
    for annotation in dataset["annotations"]:
        categories[annotation["image_id"]].add(annotation["category_id"])
    return categories


def test_the_bank_knows_every_annotated_category_of_an_image(bank):
    truth = all_annotated_categories()
    hidden = 0
    for image_id in bank.images.image_ids.tolist():
        assert bank.annotated_categories_of_image(image_id) == truth.get(image_id, set())
        hidden += len(truth.get(image_id, set()) - bank.categories_of_image(image_id))
    assert hidden > 0, "the sample has crowd or small instances that are not segments"


def test_no_background_holds_an_annotation_of_a_pasted_category(bank):
    truth = all_annotated_categories()
    sampler = Sampler(bank, BuildConfig(style="none"))
    for seed in range(300):
        rng = np.random.default_rng(seed)
        objects = 1 + seed % 2
        try:
            plan = sampler.plan(rng, objects)
        except LookupError:
            continue
        pasted = {int(bank.category_ids[obj.segment_row]) for obj in plan.objects}
        assert not truth.get(plan.background_image, set()) & pasted, (seed, plan.background_image, pasted)
