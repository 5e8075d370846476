"""Results: a sweep's summaries, the report's figures and claims, the statistics behind them
(intervals, paired tests), comparisons of changes and of evaluation tricks, the leaderboard, and the docs'
generated tables. A run's record itself is `fmnist.runs`."""
