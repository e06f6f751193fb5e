"""Several jobs in one Flower simulation (its Ray starts once): the ServerApp runs one stamp_min ServerApp
after another, each with a Context of its own, and every node counts the jobs. A job starts with the server
asking each node which client it is (the query message): the node's next_job then moves on and forgets
the client state of the job before (a finished or stopped job's state is of no use to the next).
Used by test_flower.py and test_hostile.py; import it after pytest.importorskip("flwr")."""

from flwr.app import ConfigRecord, Context, RecordDict


def job_context(context, run_config):
    """The Context one job's ServerApp runs in: the simulation's run and node, its own state and run config."""
    return Context(run_id=context.run_id, node_id=context.node_id, node_config={}, state=RecordDict(),
                   run_config=run_config)


def next_job(context):
    """On a job's query: this node's job number (0, 1, …), every earlier job's state gone."""
    job = job_of(context) + 1 if "jobs" in context.state else 0
    for key in list(context.state.keys()):
        del context.state[key]
    context.state["jobs"] = ConfigRecord({"job": job})
    return job


def job_of(context):
    """The number of the job this node is in (next_job counted it)."""
    return int(context.state["jobs"]["job"])
