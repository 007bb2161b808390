"""Reporting: leaderboards (Markdown, HTML, CSV, JSON), board figures, statistics over seeds,
comparisons and the grid's Conclusion. Reads the results store; imports ocl_bench.run and
ocl_bench.api."""
