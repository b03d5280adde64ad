"""Retrieval evaluation and its data sets, apart from the production pipeline: the grocery data set as a
catalog and queries (``make eval``, the demo, quality tests) and recall/open-set evaluation of a snapshot
on labelled queries (``storelens catalog eval``). Nothing on the build/publish path imports this package."""
