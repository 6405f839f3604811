"""klong-eval: task folders x model engine -> rollouts -> reproduction step -> judge -> report."""
