"""Which points each stage of the quality benchmark runs, in quick and full mode."""

from __future__ import annotations

from .methods import Method
from .recipes import recipe_min_p
from .run import Point, Size
from .tasks import TASKS, Task

SCREEN_TASK = TASKS["chain_sum"]
DEFAULT_FINALISTS = ("base-post",)
PLAIN_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)


SIZES = {("screen", False): Size(8, 16), ("tune", False): Size(8, 16), ("learned", False): Size(8, 16),
         ("frontier", False): Size(20, 16), ("screen", True): Size(3, 4, 16), ("tune", True): Size(3, 4, 16),
         ("learned", True): Size(3, 4, 16), ("frontier", True): Size(3, 4, 16)}
LEARNED_BETAS = (1.0, 2.0)


def esamp_method(recipe: str, temperature: float, beta: float) -> Method:
    return Method(recipe, temperature, beta=beta, min_p=recipe_min_p(recipe), recipe=recipe)


def screen_points(recipes: list[str], quick: bool, min_p_control: bool = False,
                  betas: tuple[float, ...] = (1.0,)) -> list[Point]:
    """Each recipe at each β (default 1) and T = 0.8 on a few problems, beside plain T = 0.8
    (the "screen", "tune" and "learned" stages: recipes against each other, then knobs of the
    default recipe, then the learned mix). With ``min_p_control``, also plain sampling with the
    first recipe's min-p: what the post-filter's candidate cut alone does, without the contrast."""
    points = [Point(SCREEN_TASK, Method("plain", 0.8, recipe=recipes[0]))]
    points += [Point(SCREEN_TASK, esamp_method(r, 0.8, b)) for r in recipes for b in betas]
    points = points[:2] if quick else points
    if min_p_control and recipe_min_p(recipes[0]) > 0:
        points.append(Point(SCREEN_TASK, Method("min_p", 0.8, min_p=recipe_min_p(recipes[0]), recipe=recipes[0])))
    return points


def frontier_points(tasks: list[Task], finalists: list[str], quick: bool) -> list[Point]:
    """Plain over a temperature sweep, min-p, FIRE, and each finalist at β = 1 and two temperatures."""
    home = finalists[0]  # β = 0 methods run on the first finalist's server
    fire = Method("fire", 0.8, fire_temperature=3.0, recipe=home)
    if quick:
        methods = [Method("plain", 0.8, recipe=home), fire, esamp_method(home, 0.8, 1.0)]
    else:
        methods = [Method("plain", t, recipe=home) for t in PLAIN_TEMPERATURES]
        methods += [Method("min_p", t, min_p=0.1, recipe=home) for t in (1.0, 1.5)] + [fire]
        methods += [esamp_method(r, t, 1.0) for r in finalists for t in (0.8, 1.0)]
    return [Point(task, m) for task in tasks for m in methods]
