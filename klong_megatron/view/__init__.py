"""``klong-view``: one self-contained HTML page for trajectories, rollouts and judge grades."""
