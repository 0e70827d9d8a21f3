// Starts kinesalite (a Kinesis emulator from npm) bound to 127.0.0.1 only; its own CLI listens
// on every interface. Usage: node kinesalite.js PORT (NODE_PATH must reach kinesalite).
const kinesalite = require('kinesalite');
const port = parseInt(process.argv[2], 10);
const server = kinesalite({ createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 100 });
server.listen(port, '127.0.0.1', () => console.log(`kinesalite listening on 127.0.0.1:${port}`));
