# herd's Perl preload: herd puts it in the PERL5OPT (`-MHerd::Preload`) of
# a Perl worker in the `shared` and `reuseport` modes, where clients reach
# the worker's own server and herd cannot drain them. It makes Starman,
# whose processes end at once on SIGTERM (keep-alive clients then lose the
# request they were sending), stop as herd's other servers do: a process
# waiting for a connection exits; one serving a connection answers what it
# was sent with `Connection: close` (a request arriving on its idle
# connection too, while Starman waits for one), then exits. Until Starman
# loads, it does nothing but wait for it.
package Herd::Preload;

use strict;
use warnings;

our $VERSION = '1';

# A keep-alive wait longer than this is cut into waits this long, to see
# whether the stop began (SIGTERM waits while a connection is served).
# Starman's own keep-alive time-out is 1 s.
my $SLICE = 1;

my $mode = $ENV{HERD_MODE} // '';
if ($mode eq 'shared' || $mode eq 'reuseport') {
    unshift @INC, \&_load;
}

# An @INC hook: Starman's server is loaded from where it is, then patched;
# the `require` that asked for it gets an empty module. Any other file is
# left to the rest of @INC.
sub _load {
    my (undef, $file) = @_;
    return unless $file eq 'Starman/Server.pm';
    @INC = grep { !(ref $_ && $_ == \&_load) } @INC;
    require Starman::Server;
    _patch_starman();
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
            if !$server || !defined $timeout || $timeout <= $SLICE || caller ne 'Starman::Server';
        my $end = Time::HiRes::time() + $timeout;
        while (1) {
            my $left = $end - Time::HiRes::time();
            return if $left <= 0 || $stopping->();
            my @ready = $can_read->($select, $left < $SLICE ? $left : $SLICE);
            return @ready if @ready;
        }
    };
    return;
}

1;
