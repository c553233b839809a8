# herd's Perl preload: herd puts it in the PERL5OPT (`-MHerd::Preload`) of
# a Perl worker in the `shared` and `reuseport` modes, where clients reach
# the worker's own server and herd cannot drain them. Two servers end at
# once on SIGTERM, so that keep-alive clients lose the request they were
# sending; it makes them stop as herd's other servers do:
# - Starman: a process waiting for a connection exits; one serving a
#   connection answers what it was sent with `Connection: close` (a request
#   arriving on its idle connection too, while Starman waits for one), then
#   exits.
# - Mojolicious' daemon (`perl app.pl daemon`): it stops accepting, answers
#   with `Connection: close`, closes connections still idle a second after
#   the signal, and returns from run() once none is left, as its prefork
#   workers do on SIGQUIT; WebSockets get a close frame (1001, going away).
#   A second SIGTERM stops it at once.
# Until one of them loads, it does nothing but wait for it.
package Herd::Preload;

use strict;
use warnings;

our $VERSION = '1';

# How long, in seconds, an idle keep-alive connection stays open once the
# stop began, so that a request already on its way gets its answer.
# Starman's keep-alive waits longer than this (its default is 1 s) are cut
# into waits this long, to see whether the stop began: SIGTERM waits while
# Starman serves a connection.
my $GRACE = 1;

my $mode = $ENV{HERD_MODE} // '';
# The modules patched once they load, by file.
my %PATCH = (
    'Starman/Server.pm'     => \&_patch_starman,
    'Mojo/Server/Daemon.pm' => \&_patch_mojo,
);

if ($mode eq 'shared' || $mode eq 'reuseport') {
    unshift @INC, \&_load;
}

# An @INC hook: a module of %PATCH is loaded from where it is, then
# patched; the `require` that asked for it gets an empty module. Any other
# file is left to the rest of @INC. It leaves @INC once nothing is left.
sub _load {
    my (undef, $file) = @_;
    my $patch = delete $PATCH{$file} or return;
    # (An entry of @INC may be an object whose class overloads `==`.)
    @INC = grep { !(ref $_ eq 'CODE' && $_ == \&_load) } @INC unless %PATCH;
    require $file;
    $patch->();
    my $done = "1;\n";
    open my $fh, '<', \$done or return;
    return $fh;
}

sub _patch_starman {
    require POSIX;
    require Time::HiRes;
    require IO::Select;
    my $term = POSIX::SigSet->new(POSIX::SIGTERM());
    my $pending = POSIX::SigSet->new;
    # In a Starman process: the stop began.
    my $draining = 0;
    my $stopping = sub {
        $draining
            || (POSIX::sigpending($pending) && $pending->ismember(POSIX::SIGTERM()));
    };
    # The Starman process this is, once forked: its server and the
    # connection it last took.
    my ($server, $taken);
    # Whether it is in the accept() of its listening socket.
    my $accepting = 0;
    my $finish = sub {
        $server->child_finish_hook;
        exit 0;
    };

    no strict 'refs';
    no warnings 'redefine';

    # Replaces Net::Server's SIGTERM handler (exit at once) in each process.
    my $init = \&Starman::Server::child_init_hook;
    *Starman::Server::child_init_hook = sub {
        $server = $_[0];
        my $prop = $server->{server};
        $SIG{TERM} = sub {
            $draining = 1;
            $server->done(1);
            # A connection being served, or just taken (the accept() may
            # have returned one as the signal came), ends the process.
            return if $prop->{connected} || $accepting || ($taken && defined fileno $taken);
            $finish->();
        };
        return $init->(@_);
    };

    # The accept() of Starman's listening socket: one that the stop
    # interrupted ends the process; a connection it took is served first.
    my $accept = \&IO::Socket::accept;
    *IO::Socket::accept = sub {
        my $sock = $_[0];
        return $accept->(@_)
            unless $server && grep { $_ == $sock } @{ $server->{server}{sock} || [] };
        $finish->() if $draining;
        $accepting = 1;
        my @got = wantarray ? $accept->(@_) : scalar $accept->(@_);
        $accepting = 0;
        $finish->() if !$got[0] && $draining;
        $taken = $got[0];
        return wantarray ? @got : $got[0];
    };

    # SIGTERM waits while a connection is served, so that it interrupts
    # none of its reads and writes (Perl does not resume them) nor the
    # app's own calls; the process takes it once the connection is done.
    my $process = \&Starman::Server::process_request;
    *Starman::Server::process_request = sub {
        POSIX::sigprocmask(POSIX::SIG_BLOCK(), $term);
        my $ok = eval { $process->(@_); 1 };
        my $err = $@;
        POSIX::sigprocmask(POSIX::SIG_UNBLOCK(), $term);
        die $err unless $ok;
        return;
    };

    # The answer says `Connection: close` once the stop began, and
    # Starman closes the connection after it.
    my $finalize = \&Starman::Server::_finalize_response;
    *Starman::Server::_finalize_response = sub {
        $_[0]{client}{keepalive} = 0 if $stopping->();
        return $finalize->(@_);
    };

    # Starman's wait for a keep-alive connection's next request: one
    # longer than a second (`--keepalive-timeout`) ends within a second of
    # the stop, which a blocked SIGTERM does not interrupt.
    my $can_read = \&IO::Select::can_read;
    *IO::Select::can_read = sub {
        my ($select, $timeout) = @_;
        return $can_read->(@_)
            if !$server || !defined $timeout || $timeout <= $GRACE || caller ne 'Starman::Server';
        my $end = Time::HiRes::time() + $timeout;
        while (1) {
            my $left = $end - Time::HiRes::time();
            return if $left <= 0 || $stopping->();
            my @ready = $can_read->($select, $left < $GRACE ? $left : $GRACE);
            return @ready if @ready;
        }
    };
    return;
}

# The Mojo::Server::Daemon whose run() is under way (the `daemon` command's;
# not a prefork server's, nor one a test or user agent only starts).
our $running;

sub _patch_mojo {
    no strict 'refs';
    no warnings 'redefine';
    my $run = \&Mojo::Server::Daemon::run;
    *Mojo::Server::Daemon::run = sub {
        local $running = ref $_[0] eq 'Mojo::Server::Daemon' ? $_[0] : undef;
        return $run->(@_);
    };
    # run() sets SIGTERM to stop the event loop at once, then calls start().
    my $start = \&Mojo::Server::Daemon::start;
    *Mojo::Server::Daemon::start = sub {
        my $daemon = $start->(@_);
        return $daemon unless $running && $running == $daemon;
        my $loop = $daemon->ioloop;
        my $draining = 0;
        $SIG{TERM} = sub {
            return $loop->stop if $draining++;
            $daemon->max_requests(1)->keep_alive_timeout($GRACE);
            for my $id (keys %{ $daemon->{connections} || {} }) {
                # An answer not begun says it too (its request came earlier);
                # a WebSocket is told the server is going away (1001), as the
                # SIGTERM closed it at once before.
                my $tx = $daemon->{connections}{$id}{tx};
                if ($tx && $tx->is_websocket) {
                    $tx->finish(1001);
                } elsif ($tx) {
                    $tx->res->headers->connection('close') unless $tx->{http_state};
                } elsif (my $stream = $loop->stream($id)) {
                    $stream->timeout($GRACE);
                }
            }
            $loop->stop_gracefully;
        };
        return $daemon;
    };
    return;
}

1;
