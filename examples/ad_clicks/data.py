"""Seeded ad-click generator: the logistic-regression textbook case.

Clicks follow a logistic model of browsing history, past clicks, age, device and time on site.
`gender` has no effect by construction, so the model must be invariant to it (a fairness check).
"""

import numpy as np
import pandas as pd

DEVICES = {"desktop": 0.3, "mobile": 0.0, "tablet": -0.4}


def generate(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = np.clip(rng.normal(38, 12, rows), 18, 85).round()
    gender = rng.choice(["female", "male", "nonbinary"], size=rows, p=[0.49, 0.49, 0.02])
    pages_viewed = rng.poisson(lam=25, size=rows).astype(float)  # browsing history, last 30 days
    previous_clicks = rng.poisson(lam=1.5, size=rows).astype(float)
    time_on_site = np.clip(rng.gamma(shape=3.0, scale=4.0, size=rows), 0.1, 120).round(1)
    device = rng.choice(list(DEVICES), size=rows, p=[0.35, 0.55, 0.10])
    logit = (
        -5.6
        + 0.10 * pages_viewed
        + 0.60 * previous_clicks
        - 0.035 * (age - 38)
        + 0.07 * time_on_site
        + np.vectorize(DEVICES.get)(device)
    )
    clicked = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    frame = pd.DataFrame(
        {
            "age": age,
            "gender": gender,
            "pages_viewed": pages_viewed,
            "previous_clicks": previous_clicks,
            "time_on_site": time_on_site,
            "device": device,
            "clicked": clicked,
        }
    )
    for column, rate in {"time_on_site": 0.03, "device": 0.02, "age": 0.01}.items():
        frame.loc[rng.random(rows) < rate, column] = None
    return frame
