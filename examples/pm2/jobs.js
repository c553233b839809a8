// A queue consumer as PM2 users write one. It serves no port, so herd runs
// it in fork mode, as PM2 does (its app has no env.PORT, exec_mode or instances),
// and it finishes its job on SIGINT, PM2's stop signal, which herd's Node
// preload gives an app that handles SIGINT only.
let n = 0;
const timer = setInterval(() => console.log(`job ${++n} done`), 1000);
process.on('SIGINT', () => {
  clearInterval(timer);
  console.log('finishing the current job');
  process.exit(0);
});
