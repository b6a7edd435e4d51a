"""The e-mail provider of the delivery tests: a real SMTP server (aiosmtpd) that keeps
every accepted message as a file and misbehaves on request, by recipient:

- bounce*@...   -> 550 5.1.1 (the address does not exist: a hard bounce)
- tempfail*@... -> 450 4.7.1 (greylisted) for the first TEMPFAILS attempts, then accepted
- reject*@...   -> 554 5.7.1 at DATA (a permanent policy rejection)
- slow*@...     -> answers DATA after SLOW_SECONDS
- spam*@...     -> 550 5.7.1 at DATA (the message refused, not the mailbox)
- datadrop*@... -> 451 4.7.1 at DATA on the first attempt, the connection dropped
                   without an answer at RCPT on the second, accepted on the third

and by sender: blocked*@... -> 553 5.7.1 to MAIL FROM (the relay refuses the sender).

Run: python3 -m aiosmtpd -n -l 127.0.0.1:PORT -c smtp_sink.Sink OUT_DIR [TEMPFAILS] [SLOW_SECONDS]
"""

import asyncio
import itertools
import os


class Sink:
    def __init__(self, out_dir, tempfails="2", slow_seconds="3"):
        self.out_dir = out_dir
        self.tempfails = int(tempfails)
        self.slow_seconds = float(slow_seconds)
        self.attempts = {}
        self.counter = itertools.count()
        os.makedirs(out_dir, exist_ok=True)

    @classmethod
    def from_cli(cls, parser, *args):
        return cls(*args)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if address.split("@")[0].startswith("blocked"):
            return "553 5.7.1 Sender address rejected: not owned by user"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("bounce"):
            return "550 5.1.1 No such user"
        if local.startswith("tempfail"):
            n = self.attempts.get(address, 0)
            self.attempts[address] = n + 1
            if n < self.tempfails:
                return "450 4.7.1 Greylisted, try again later"
        if local.startswith("datadrop"):
            n = self.attempts.get(address, 0)
            self.attempts[address] = n + 1
            if n == 1:
                # No answer at all: the client sees the connection go.
                server.transport.abort()
                return "421 closing"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        local = envelope.rcpt_tos[0].split("@")[0] if envelope.rcpt_tos else ""
        if local.startswith("reject"):
            return "554 5.7.1 Message rejected by policy"
        if local.startswith("spam"):
            return "550 5.7.1 Message rejected as spam"
        if local.startswith("datadrop") and self.attempts.get(envelope.rcpt_tos[0], 0) == 1:
            return "451 4.7.1 Try again later"
        if local.startswith("slow"):
            await asyncio.sleep(self.slow_seconds)
        name = f"{os.getpid()}-{next(self.counter):08d}.eml"
        tmp = os.path.join(self.out_dir, "." + name)
        with open(tmp, "wb") as f:
            # What RCPT TO named, as the first header line (the message may say
            # otherwise in its To header).
            f.write(("X-Envelope-To: " + ",".join(envelope.rcpt_tos) + "\r\n").encode())
            f.write(envelope.original_content or envelope.content)
            f.flush()
            os.fsync(f.fileno())
        # Atomic: a reader never sees half a message.
        os.rename(tmp, os.path.join(self.out_dir, name))
        return "250 Message accepted for delivery"
