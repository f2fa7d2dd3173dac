#!/usr/bin/env escript
%% The reference for `warden bench`'s restart figure, on the same machine in the same run: a
%% permanent child of a one_for_one supervisor (the same intensity as Warden's benchmark
%% supervisor: a million restarts per second, so it never gives up) is crashed N times. A
%% sample runs from the moment the child crashes to the moment the supervisor starts the new
%% one (its start function), taken with the monotonic clock. Prints "p50_us p99_us samples".
-mode(compile).
-export([init/1, start_child/0]).

main([N0]) ->
    N = list_to_integer(N0),
    ets:new(times, [named_table, public]),
    {ok, _} = supervisor:start_link({local, bench_sup}, ?MODULE, []),
    _ = [crash_once() || _ <- lists:seq(1, 100)],
    Samples = lists:sort([crash_once() || _ <- lists:seq(1, N)]),
    Pick = fun(P) -> lists:nth(max(1, round(P * length(Samples))), Samples) end,
    io:format("~b ~b ~b~n", [Pick(0.50), Pick(0.99), length(Samples)]);
main(_) ->
    io:format(standard_error, "usage: otp_restart.escript ROUNDS~n", []),
    halt(2).

init([]) ->
    Flags = #{strategy => one_for_one, intensity => 1000000, period => 1},
    Child = #{id => counter, start => {?MODULE, start_child, []},
              restart => permanent, shutdown => brutal_kill},
    {ok, {Flags, [Child]}}.

%% Runs in the supervisor: the restart is done once this returns.
start_child() ->
    ets:insert(times, {started, erlang:monotonic_time(nanosecond)}),
    {ok, spawn_link(fun child/0)}.

child() ->
    receive
        crash ->
            ets:insert(times, {crashed, erlang:monotonic_time(nanosecond)}),
            exit(crash)
    end.

crash_once() ->
    Old = child_pid(),
    Ref = monitor(process, Old),
    Old ! crash,
    receive {'DOWN', Ref, process, Old, _} -> ok end,
    wait_new(Old),
    [{crashed, C}] = ets:lookup(times, crashed),
    [{started, S}] = ets:lookup(times, started),
    (S - C) div 1000.

child_pid() ->
    [{counter, Pid, worker, _}] = supervisor:which_children(bench_sup),
    Pid.

wait_new(Old) ->
    case child_pid() of
        Pid when is_pid(Pid), Pid =/= Old -> ok;
        _ -> wait_new(Old)
    end.
