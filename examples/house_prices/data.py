"""Seeded house-price generator: the linear-regression textbook case with realistic mess.

Price is linear in area, rooms, age and neighbourhood plus Gaussian noise; a few values are
missing, and `listing_weekday` is deliberately unrelated to price (the invariance test uses it).
"""

import numpy as np
import pandas as pd

NEIGHBOURHOODS = {"downtown": 60_000.0, "riverside": 35_000.0, "suburb": 0.0, "rural": -40_000.0}
WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def generate(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    area = np.clip(rng.lognormal(mean=np.log(110), sigma=0.4, size=rows), 25, 600).round(1)
    bedrooms = np.clip(np.round(area / 35 + rng.normal(0, 0.7, rows)), 1, 8)
    bathrooms = np.clip(np.round(bedrooms / 2 + rng.normal(0, 0.5, rows)), 1, 5)
    age = np.clip(rng.gamma(shape=2.0, scale=15.0, size=rows), 0, 120).round()
    hood = rng.choice(list(NEIGHBOURHOODS), size=rows, p=[0.2, 0.15, 0.45, 0.2])
    price = (
        40_000
        + 2_100 * area
        + 6_000 * bedrooms
        + 11_000 * bathrooms
        - 650 * age
        + np.vectorize(NEIGHBOURHOODS.get)(hood)
        + rng.normal(0, 22_000, rows)
    )
    frame = pd.DataFrame(
        {
            "area": area,
            "bedrooms": bedrooms,
            "bathrooms": bathrooms,
            "age_years": age,
            "neighbourhood": hood,
            "listing_weekday": rng.choice(WEEKDAYS, size=rows),
            "price": np.maximum(price, 20_000).round(-2),
        }
    )
    # Missing values as real listings have them: unknown age, bathrooms, neighbourhood.
    for column, rate in {"age_years": 0.03, "bathrooms": 0.02, "neighbourhood": 0.01}.items():
        frame.loc[rng.random(rows) < rate, column] = None
    return frame
