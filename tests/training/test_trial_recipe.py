"""What a Tune trial trains with, from the recipe and the trial's point (no Ray)."""

from __future__ import annotations

from echopulse.config import replace
from jobs.recipes import demo
from jobs.tune_masking import search_space, trial_recipe


def test_a_trial_validates_at_every_logged_step_whatever_the_recipes_cadence():
    # a recipe that validates rarely (a long demo run) still gives the scheduler a figure per log
    recipe = demo()
    recipe = replace(recipe, generator_train=replace(recipe.generator_train, val_every=250))
    trial = search_space(recipe.tune, recipe.generator_train.lr)[1]
    train = trial_recipe(recipe, trial).generator_train
    assert train.val_every == 0 and train.steps == recipe.tune.steps
    assert train.log_every == min(recipe.generator_train.log_every, recipe.tune.steps)
    assert train.lr == trial["lr"] and trial_recipe(recipe, trial).generator.schedule == trial["schedule"]
